"""Evaluation of a frozen backbone on a labelled reference / query pair of image data sets.

:func:`evaluate` is what ``twinview evaluate`` reports: kNN, retrieval (queries against the
reference gallery), verification on query pairs, representation diagnostics, and optionally a
linear probe and plots. :func:`knn_only` is the cheap part, for the online monitor during
pretraining. Both take plain arguments (a backbone, data sets, an :class:`EvalConfig`, ...), nothing
of a pretraining run, and every section has its own function below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twinview.augment.config import AugmentConfig
from twinview.augment.views import build_views
from twinview.evaluate.config import EvalConfig
from twinview.evaluate.dataset import LabelledImages, check_labelled_pair
from twinview.evaluate.features import FeatureExtractor, state_checksum
from twinview.evaluate.knn import knn_accuracy
from twinview.evaluate.linear_probe import linear_probe
from twinview.evaluate.metrics import (
    alignment,
    collapse_warning,
    effective_rank,
    retrieval_metrics,
    uniformity,
    verification_metrics,
)

ALIGNMENT_SAMPLE = 512  # query images whose two views are compared
DIAGNOSTIC_SAMPLE = 2000  # query features for uniformity and effective rank
VERIFICATION_PAIRS = 20000  # at most this many genuine and as many impostor pairs
GRID_QUERIES = 6  # rows of the nearest-neighbour plot
GRID_NEIGHBOURS = 6  # neighbours per row


@dataclass(frozen=True)
class FrozenFeatures:
    """Features and labels of the reference and query sets.

    Attributes:
        reference: ``(N, D)`` reference features.
        reference_labels: ``(N,)`` their labels.
        query: ``(M, D)`` query features.
        query_labels: ``(M,)`` their labels.
    """

    reference: torch.Tensor
    reference_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    backbone: nn.Module,
    reference: LabelledImages,
    query: LabelledImages,
    eval_cfg: EvalConfig,
    augment: AugmentConfig,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_workers: int = 2,
    device: torch.device | None = None,
    accelerator: Any | None = None,
    probe: bool = False,
    seed: int = 0,
    plots_dir: Path | None = None,
    features_dir: Path | None = None,
) -> dict[str, Any]:
    """Extracts frozen features of both sets and scores them.

    Args:
        backbone: The backbone; its weights are not changed.
        reference: Labelled reference set (kNN memory, retrieval gallery, probe training data).
        query: Labelled query set with the same classes.
        eval_cfg: kNN k and temperature, extraction batch size.
        augment: The views whose alignment is measured (the run's recipe).
        image_size: Side of those views' source images (``data.image_size``).
        mean: Normalisation mean of the backbone.
        std: Normalisation std of the backbone.
        num_workers: Decoding workers of the extraction.
        device: Where to run; defaults to CUDA when available.
        accelerator: With several processes (``accelerate launch``), extraction is split among them
            and gathered; every process then holds all features and computes the same metrics.
        probe: Also train and score a linear probe on the frozen features (seeded with ``seed``).
        seed: Seed of the linear probe.
        plots_dir: Also draw the embedding map and a nearest-neighbour grid there.
        features_dir: Cache the features of each set there, keyed by its fingerprint and the
            backbone's weights, so a second evaluation skips the extraction.

    Returns:
        ``knn_top1``, ``knn_top5``, ``k``, ``temperature``, ``num_train``, ``num_test``, and the
        ``retrieval``, ``verification``, ``diagnostics`` (and ``linear_probe``, ``plots``) sections,
        plus ``backbone_unchanged`` (the backbone's weights and buffers were not modified).

    Raises:
        ValueError: If a set is unlabeled or the class names differ.
    """
    check_labelled_pair(reference, query)
    device = device or default_device()
    before = state_checksum(backbone)
    extractor = FeatureExtractor(
        backbone, mean, std, eval_cfg.batch_size, num_workers, device, accelerator, features_dir
    )
    features = frozen_features(extractor, reference, query)
    result = knn_result(features, eval_cfg)
    result["retrieval"] = retrieval_result(features)
    result["verification"] = verification_result(features)
    result["diagnostics"] = {
        **feature_diagnostics(features.query),
        "alignment": view_alignment(backbone, query, augment, image_size, mean, std, device),
    }
    if probe:
        result["linear_probe"] = linear_probe(
            features.reference, features.reference_labels, features.query, features.query_labels, seed=seed
        )
    if plots_dir is not None:
        result["plots"] = draw_plots(Path(plots_dir), reference, query, features)
    result["backbone_unchanged"] = state_checksum(backbone) == before
    return result


def knn_only(
    backbone: nn.Module,
    reference: LabelledImages,
    query: LabelledImages,
    eval_cfg: EvalConfig,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_workers: int = 2,
    device: torch.device | None = None,
    accelerator: Any | None = None,
    features_dir: Path | None = None,
) -> dict[str, Any]:
    """The kNN part of :func:`evaluate` alone: features of both sets, then kNN top-1 / top-5.

    Args:
        backbone: The backbone; its weights are not changed.
        reference: Labelled reference set (the kNN memory).
        query: Labelled query set with the same classes.
        eval_cfg: kNN k and temperature, extraction batch size.
        mean: Normalisation mean of the backbone.
        std: Normalisation std of the backbone.
        num_workers: Decoding workers of the extraction.
        device: Where to run; defaults to CUDA when available.
        accelerator: Several processes split the extraction (see :func:`evaluate`).
        features_dir: Feature cache (see :func:`evaluate`).

    Returns:
        ``knn_top1``, ``knn_top5``, ``k``, ``temperature``, ``num_train``, ``num_test``: the same
        values :func:`evaluate` returns under these keys.

    Raises:
        ValueError: If a set is unlabeled or the class names differ.
    """
    check_labelled_pair(reference, query)
    extractor = FeatureExtractor(
        backbone, mean, std, eval_cfg.batch_size, num_workers, device or default_device(), accelerator, features_dir
    )
    return knn_result(frozen_features(extractor, reference, query), eval_cfg)


def frozen_features(extractor: FeatureExtractor, reference: LabelledImages, query: LabelledImages) -> FrozenFeatures:
    """Features and labels of both sets (from the extractor's cache when it has them)."""
    reference_x, reference_y = extractor(reference)
    query_x, query_y = extractor(query)
    return FrozenFeatures(reference_x, reference_y, query_x, query_y)


def knn_result(features: FrozenFeatures, eval_cfg: EvalConfig) -> dict[str, Any]:
    """Weighted kNN top-1 / top-5 of the queries against the reference set, with its settings and sizes."""
    acc = knn_accuracy(
        features.reference,
        features.reference_labels,
        features.query,
        features.query_labels,
        k=eval_cfg.knn_k,
        temperature=eval_cfg.knn_temperature,
    )
    return {
        "knn_top1": acc["top1"],
        "knn_top5": acc["top5"],
        "k": eval_cfg.knn_k,
        "temperature": eval_cfg.knn_temperature,
        "num_train": len(features.reference),
        "num_test": len(features.query),
    }


def retrieval_result(features: FrozenFeatures) -> dict[str, float]:
    """Recall@K, precision@1 and MAP@R of the queries against the reference gallery."""
    return retrieval_metrics(features.query, features.query_labels, features.reference, features.reference_labels)


def verification_result(features: FrozenFeatures) -> dict[str, float]:
    """ROC AUC, EER and TAR at FAR=1e-3 on random genuine and impostor pairs of query images."""
    return verification_metrics(*verification_pairs(features.query, features.query_labels))


def verification_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of random (seeded) genuine and impostor pairs, up to ``VERIFICATION_PAIRS`` each.

    Returns:
        ``(P,)`` scores and ``(P,)`` bool, True for a genuine (same-label) pair.
    """
    g = torch.Generator().manual_seed(0)
    n = len(labels)
    a = torch.randint(0, n, (4 * VERIFICATION_PAIRS,), generator=g)
    b = torch.randint(0, n, (4 * VERIFICATION_PAIRS,), generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    same = labels[a] == labels[b]
    genuine = same.nonzero().squeeze(1)[:VERIFICATION_PAIRS]
    impostor = (~same).nonzero().squeeze(1)[:VERIFICATION_PAIRS]
    pick = torch.cat([genuine, impostor])
    x = F.normalize(features, dim=1)
    return (x[a[pick]] * x[b[pick]]).sum(dim=1), same[pick]


def feature_diagnostics(features: torch.Tensor) -> dict[str, Any]:
    """Uniformity and effective rank of a (seeded) sample of the features, with a collapse warning."""
    g = torch.Generator().manual_seed(0)
    sample = features[torch.randperm(len(features), generator=g)[:DIAGNOSTIC_SAMPLE]]
    return {
        "uniformity": uniformity(sample),
        "effective_rank": effective_rank(sample),
        "dims": features.shape[1],
        "collapse_warning": collapse_warning(sample),
    }


@torch.no_grad()
def view_alignment(
    backbone: nn.Module,
    dataset: LabelledImages,
    augment: AugmentConfig,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> float:
    """Wang & Isola's alignment of two augmented views (seeded) of a sample of the data set's images.

    Args:
        backbone: Run in eval mode (its mode is restored).
        dataset: Source of up to ``ALIGNMENT_SAMPLE`` images, drawn with seed 0.
        augment: The views' recipe.
        image_size: Side of the source images.
        mean: Normalisation mean of the backbone.
        std: Normalisation std of the backbone.
        device: Where to make the views and run the backbone.
    """
    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(dataset), generator=g)[:ALIGNMENT_SAMPLE].tolist()
    images = torch.stack([dataset[i][0] for i in picks]).to(device)
    view_a, view_b = build_views(augment, image_size, mean, std, seed=0, device=device)(images)[:2]
    was_training = backbone.training
    backbone.eval().to(device)
    result = alignment(backbone(view_a).float(), backbone(view_b).float())
    backbone.train(was_training)
    return result


def draw_plots(folder: Path, reference: LabelledImages, query: LabelledImages, features: FrozenFeatures) -> list[str]:
    """The embedding map of the queries and a nearest-neighbour grid, as PNG files in ``folder``.

    Returns:
        The paths of the two files.
    """
    from twinview.evaluate import plots  # matplotlib only when plots are asked for

    folder.mkdir(parents=True, exist_ok=True)
    query_y = torch.tensor(query.index.labels)
    embeddings = plots.embedding_map(features.query, query_y, query.index.classes, folder / "embeddings.png")
    return [str(embeddings), str(neighbour_grid(folder / "neighbours.png", reference, query, features))]


def neighbour_grid(out: Path, reference: LabelledImages, query: LabelledImages, features: FrozenFeatures) -> Path:
    """``GRID_QUERIES`` random (seeded) queries with their nearest reference images.

    Only the reference images the grid shows are decoded.
    """
    from twinview.evaluate import plots

    query_y, reference_y = torch.tensor(query.index.labels), torch.tensor(reference.index.labels)
    g = torch.Generator().manual_seed(0)
    queries = torch.randperm(len(query), generator=g)[:GRID_QUERIES]
    sims = F.normalize(features.query[queries], dim=1) @ F.normalize(features.reference, dim=1).T
    shown = sims.topk(GRID_NEIGHBOURS, dim=1).indices.flatten().unique()  # sorted
    return plots.retrieval_grid(
        torch.stack([query[int(i)][0] for i in queries]),
        query_y[queries],
        features.query[queries],
        torch.stack([reference[int(j)][0] for j in shown]),
        reference_y[shown],
        features.reference[shown],
        out,
        k=GRID_NEIGHBOURS,
    )
