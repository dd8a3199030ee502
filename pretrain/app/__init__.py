"""The application layer: the ``twinview`` command and what its commands orchestrate (a run's
training, evaluation, embedding and search, export, preview, the demo).

The commands call the library: ``twinview.pretrain`` (config, data, objectives, engine, runs),
``twinview.augment`` and ``twinview.evaluate``. ``evaluate``, ``embed``, ``search`` and ``preview``
resolve their data sources and model once and pass them down; ``pretrain`` hands its config to the
engine, whose ``build_run`` resolves ``data.path`` once. No library module imports this package
(tests/test_structure.py); the benchmark scripts may.
"""
