"""The application layer: the ``twinview`` command and what its commands orchestrate (a run's
training, evaluation, embedding and search, export, preview, the demo).

Each command resolves its data sources and its model once and passes them to the library:
``twinview.pretrain`` (config, data, objectives, engine, runs), ``twinview.augment`` and
``twinview.evaluate``. Nothing outside this package imports it (tests/test_structure.py).
"""
