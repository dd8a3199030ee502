"""kNN evaluation of a backbone on a labelled train/test pair of image folders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from twinview.evaluate.features import extract_features
from twinview.evaluate.knn import knn_accuracy
from twinview.pretrain.config import Config
from twinview.pretrain.data import ImageFolderDataset
from twinview.pretrain.models import create_backbone, normalization_stats


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_knn(
    backbone: nn.Module,
    cfg: Config,
    train_path: str,
    test_path: str,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Extracts frozen features of both folders and scores the test set with weighted kNN.

    Args:
        backbone: The (trained) backbone.
        cfg: Run config (image size, kNN k and temperature, batch size, workers).
        train_path: Labelled reference folder (class sub-folders).
        test_path: Labelled query folder with the same class names.
        device: Where to run; defaults to CUDA when available.

    Returns:
        ``{"knn_top1", "knn_top5", "k", "temperature", "num_train", "num_test"}``.

    Raises:
        ValueError: If a folder is unlabeled or the class names differ.
    """
    device = device or default_device()
    train_set = ImageFolderDataset(train_path, cfg.data.image_size)
    test_set = ImageFolderDataset(test_path, cfg.data.image_size)
    for name, ds in (("--train", train_set), ("--test", test_set)):
        if not ds.index.labeled:
            raise ValueError(f"{name} '{ds.index.root}' has no class sub-folders; kNN needs labels.")
    if train_set.index.classes != test_set.index.classes:
        raise ValueError(
            f"class folders differ: train has {list(train_set.index.classes)}, test has {list(test_set.index.classes)}."
        )
    mean, std = normalization_stats(backbone)
    kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device=device)
    train_x, train_y = extract_features(backbone, train_set, mean, std, **kwargs)
    test_x, test_y = extract_features(backbone, test_set, mean, std, **kwargs)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    return {
        "knn_top1": acc["top1"],
        "knn_top5": acc["top5"],
        "k": cfg.eval.knn_k,
        "temperature": cfg.eval.knn_temperature,
        "num_train": len(train_set),
        "num_test": len(test_set),
    }


def random_init_backbone(cfg: Config) -> nn.Module:
    """A randomly initialised copy of the run's backbone (same architecture, seed ``train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    return create_backbone(cfg.model)
