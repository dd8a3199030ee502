"""The ``eval`` config section: how frozen features are scored; the label-free evaluation's default
threshold and the explorer's map methods."""

from __future__ import annotations

from dataclasses import dataclass

# The default cosine threshold of near-duplicates in the label-free evaluation (``twinview evaluate
# --data``, ``--duplicate-threshold``): where F1 peaked on copies planted in Imagewoof-96
# (docs/BENCHMARKS.md, "Without labels"). Here, not in evaluate/unlabelled.py, so the command-line
# help reads it without importing torch.
DUPLICATE_THRESHOLD = 0.985
# The explorer's 2-D maps (evaluate/explorer.py), here for the same reason.
MAP_METHODS = ("auto", "umap", "tsne", "pca")
TSNE_MAX_ROWS = 20_000  # beyond, scikit-learn's t-SNE takes many minutes on a few cores: PCA then


@dataclass
class EvalConfig:
    """Evaluation of frozen features.

    Attributes:
        knn_k: Number of neighbours of the weighted kNN classifier.
        knn_temperature: Temperature of the kNN's exp(sim / T) vote weights.
        batch_size: Images per forward pass when extracting features.
        monitor_every: During pretraining, kNN top-1 on a labelled hold-out every N epochs (0: off),
            logged in metrics.jsonl and plotted by ``twinview evaluate``.
        monitor_train: Labelled reference folder of the monitor (class sub-folders).
        monitor_test: Labelled query folder of the monitor.
    """

    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 512
    monitor_every: int = 0
    monitor_train: str = ""
    monitor_test: str = ""
