"""A run's backbone scored by :mod:`twinview.evaluate.run`, with what the run's Config says.

``twinview evaluate``, ``twinview demo`` and the online monitor load their labelled folders and
take the image size, kNN settings, augment recipe and seed from the run's config here;
``twinview.evaluate`` itself knows nothing of a pretraining run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twinview.evaluate.dataset import LabelledImages, check_labelled_pair
from twinview.evaluate.run import default_device, evaluate
from twinview.pretrain.config import Config
from twinview.pretrain.data.images import open_images
from twinview.pretrain.models import create_backbone, normalization_stats

if TYPE_CHECKING:
    from twinview.evaluate.embed import EmbedSummary


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


def embed_images(
    backbone: nn.Module,
    cfg: Config,
    source: str,
    out: Path,
    *,
    made_from: str,
    split: str = "train",
    dtype: str = "float32",
    overwrite: bool = False,
    accelerator: Any | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """:func:`twinview.evaluate.embed.embed_source` of every image of ``source`` with the run's settings.

    Images are loaded at ``data.image_size`` with ``data.num_workers`` decoding workers and embedded
    ``eval.batch_size`` at a time, exactly as ``twinview evaluate`` extracts features; an image that
    cannot be decoded is listed in ``OUT.skipped.txt`` instead of being replaced.

    Args:
        backbone: The backbone to embed with.
        cfg: The run's config.
        source: Anything ``data.path`` accepts.
        out: ``.parquet`` or ``.npy`` file.
        made_from: The run directory or export, stored in the file's metadata.
        split: Split of a Hugging Face source.
        dtype: ``float32`` or ``float16`` in the file.
        overwrite: Replace an existing file.
        accelerator: Several processes (``accelerate launch``) split the images.
        progress: Show a progress bar.
    """
    from twinview.evaluate.embed import embed_source
    from twinview.evaluate.features import state_checksum
    from twinview.pretrain import __version__
    from twinview.pretrain.data.decode import BadImage

    mean, std = normalization_stats(backbone)
    metadata = {
        "model": cfg.model.backbone,
        "made_from": made_from,
        "image_size": cfg.data.size,
        "weights": state_checksum(backbone),
        "source": source,
        "twinview": __version__,
    }
    return embed_source(
        backbone,
        open_images(source, cfg.data.size, split, strict=True),
        out,
        mean,
        std,
        metadata=metadata,
        dtype=dtype,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=accelerator.device if accelerator is not None else default_device(),
        accelerator=accelerator,
        skip_errors=(BadImage,),
        overwrite=overwrite,
        progress=progress,
    )
