"""A run's backbone scored by :mod:`twinview.evaluate.run`, with what the run's Config says.

``twinview evaluate``, ``twinview demo`` and the online monitor load their labelled folders and
take the image size, kNN settings, augment recipe and seed from the run's config here;
``twinview.evaluate`` itself knows nothing of a pretraining run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinview.evaluate.dataset import LabelledImages, check_labelled_pair
from twinview.evaluate.run import evaluate
from twinview.pretrain.config import Config
from twinview.pretrain.data.images import open_images
from twinview.pretrain.models import create_backbone, normalization_stats


def labelled_folders(
    train_path: str, test_path: str, image_size: int, names: tuple[str, str] = ("--train", "--test")
) -> tuple[LabelledImages, LabelledImages]:
    """The reference and query data sets of two labelled sources.

    Args:
        train_path: Labelled reference: a folder of class sub-folders, a labelled file list, a
            Hugging Face source with a label column or tar shards with ``.cls`` fields.
        test_path: Labelled query source with the same class names.
        image_size: Side the images are loaded at.
        names: How the two are called in error messages.

    Raises:
        ValueError: If a folder is unlabeled or the class names differ.
    """
    reference, query = open_images(train_path, image_size), open_images(test_path, image_size)
    check_labelled_pair(reference, query, names)
    return reference, query


def random_init_backbone(cfg: Config) -> nn.Module:
    """A randomly initialised copy of the run's backbone (same architecture, seed ``train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    return create_backbone(cfg.model)


def evaluate_backbone(
    backbone: nn.Module,
    cfg: Config,
    reference: LabelledImages,
    query: LabelledImages,
    *,
    probe: bool = False,
    device: torch.device | None = None,
    accelerator: Any | None = None,
    plots_dir: Path | None = None,
    features_dir: Path | None = None,
) -> dict[str, Any]:
    """:func:`twinview.evaluate.run.evaluate` of ``backbone`` with the run's settings.

    The config gives the kNN settings and batch size (``eval``), the decoding workers and the image
    size (``data``), the recipe whose view alignment is measured (``augment``) and the probe's seed;
    the backbone gives its normalisation. The other arguments are passed on.
    """
    mean, std = normalization_stats(backbone)
    return evaluate(
        backbone,
        reference,
        query,
        cfg.eval,
        cfg.augment,
        cfg.data.size,
        mean,
        std,
        num_workers=cfg.data.num_workers,
        device=device,
        accelerator=accelerator,
        probe=probe,
        seed=cfg.train.seed,
        plots_dir=plots_dir,
        features_dir=features_dir,
    )
