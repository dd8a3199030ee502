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

import numpy as np
import torch
import torch.nn.functional as F

from twinview.augment.config import AugmentConfig
from twinview.augment.views import build_views
from twinview.evaluate.config import DUPLICATE_THRESHOLD, EvalConfig
from twinview.evaluate.dataset import Images, LabelledImages, check_labelled_pair
from twinview.evaluate.features import Embedder
from twinview.evaluate.knn import knn_accuracy
from twinview.evaluate.label_free import LEAK_WARN_FRACTION, Leak, file_digest, find_leaks, write_leaks_csv
from twinview.evaluate.linear_probe import linear_probe
from twinview.evaluate.metrics import (
    alignment,
    collapse_warning,
    effective_rank,
    retrieval_metrics,
    uniformity,
    verification_metrics,
)
from twinview.evaluate.results import Diagnostics, KnnResult, LabelledResult, Leaks, SimilarityStats

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
    embedder: Embedder,
    reference: LabelledImages,
    query: LabelledImages,
    eval_cfg: EvalConfig,
    augment: AugmentConfig,
    *,
    probe: bool = False,
    seed: int = 0,
    plots_dir: Path | None = None,
    features_dir: Path | None = None,
    leaks_dir: Path | None = None,
    scan_workers: int = 2,
) -> LabelledResult:
    """Extracts frozen features of both sets and scores them.

    Args:
        embedder: The backbone with its normalisation and extraction settings; with several
            processes (its ``accelerator``) extraction is split among them and gathered, and every
            process computes the same metrics. Its weights are not changed.
        reference: Labelled reference set (kNN memory, retrieval gallery, probe training data).
        query: Labelled query set with the same classes.
        eval_cfg: kNN k and temperature.
        augment: The views whose alignment is measured (the run's recipe).
        probe: Also train and score a linear probe on the frozen features (seeded with ``seed``).
        seed: Seed of the linear probe.
        plots_dir: Also draw the embedding map and a nearest-neighbour grid there.
        features_dir: Cache the features of each set there, keyed by its fingerprint and the
            backbone's weights, so a second evaluation skips the extraction.
        leaks_dir: Also look for test images that are near-duplicates of training images
            (:func:`leak_report`) and write ``leaks.csv`` there.
        scan_workers: DataLoader workers of the leak check's hashing pass.

    Returns:
        The :class:`~twinview.evaluate.results.LabelledResult`.

    Raises:
        ValueError: If a set is unlabeled or the class names differ.
    """
    check_labelled_pair(reference, query)
    before = embedder.weights()
    features = frozen_features(embedder, reference, query, features_dir)
    diagnostics = feature_diagnostics(features.query, view_alignment(embedder, query, augment))
    leaks = None
    if leaks_dir is not None:
        leaks = leak_report(
            features, reference, query, eval_cfg, leaks_dir, probe=probe, seed=seed, workers=scan_workers
        )
    return LabelledResult(
        knn=knn_result(features, eval_cfg),
        retrieval=retrieval_result(features),
        verification=verification_result(features),
        diagnostics=diagnostics,
        linear_probe=linear_probe(
            features.reference, features.reference_labels, features.query, features.query_labels, seed=seed
        )
        if probe
        else None,
        plots=tuple(draw_plots(Path(plots_dir), reference, query, features)) if plots_dir is not None else (),
        backbone_unchanged=embedder.weights() == before,
        leaks=leaks,
    )


def leak_report(
    features: FrozenFeatures,
    reference: LabelledImages,
    query: LabelledImages,
    eval_cfg: EvalConfig,
    out_dir: Path,
    *,
    probe: bool = False,
    seed: int = 0,
    workers: int = 2,
    threshold: float = DUPLICATE_THRESHOLD,
) -> Leaks:
    """Test images that are near-duplicates of training images
    (:func:`~twinview.evaluate.label_free.find_leaks`: the cosine threshold of near-duplicates, or
    perceptual hashes of the image and its mirror), written to ``out_dir/leaks.csv``, and kNN (and
    the probe) scored again without them: a score on a test set that shares images with the
    training set is inflated.
    """
    from twinview.evaluate.perceptual import MAX_DISTANCE

    found, exact, path = detect_leaks(
        features.reference, features.query, reference, query, out_dir, workers=workers, threshold=threshold
    )
    test_names = query.index.files
    keep = torch.ones(len(features.query), dtype=torch.bool)
    keep[[x.test for x in found]] = False
    kept = FrozenFeatures(
        features.reference, features.reference_labels, features.query[keep], features.query_labels[keep]
    )
    knn = knn_result(kept, eval_cfg) if keep.any() else None
    probed = None
    if probe and found and keep.any():
        probed = linear_probe(kept.reference, kept.reference_labels, kept.query, kept.query_labels, seed=seed).top1
    share = len(found) / max(1, len(test_names))
    warning = ""
    if share > LEAK_WARN_FRACTION:
        warning = (
            f"{len(found)} of {len(test_names)} test images ({share:.1%}) are near-duplicates of training images "
            f"({path}): scores on this test set are inflated; compare the scores without them"
        )
    return Leaks(
        test_images=len(test_names),
        leaked=len(found),
        exact=sum(exact),
        csv=str(path),
        threshold=threshold,
        hash_max_distance=MAX_DISTANCE,
        knn_top1_without=knn.top1 if knn else None,
        knn_top5_without=knn.top5 if knn else None,
        probe_top1_without=probed,
        warning=warning,
    )


def detect_leaks(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    train: LabelledImages,
    test: LabelledImages,
    out_dir: Path,
    *,
    workers: int = 2,
    threshold: float = DUPLICATE_THRESHOLD,
) -> tuple[list[Leak], list[bool], Path]:
    """The test images that are near-duplicates of training images, labelled or not: hashes of both
    sets (one more decoding pass), :func:`~twinview.evaluate.label_free.find_leaks`, byte copies
    marked, and ``out_dir/leaks.csv``.

    Returns:
        The leaks, whether each is a byte copy, and the CSV.
    """
    from twinview.evaluate.perceptual import MAX_DISTANCE, scan_images

    scans = (scan_images(train, workers), scan_images(test, workers))
    hashes = (scans[0].hashes, scans[1].hashes)
    thumbs = (scans[0].thumbs, scans[1].thumbs)
    found = find_leaks(train_features, test_features, threshold, hashes, MAX_DISTANCE, thumbs)
    train_names = [str(f) for f in train.index.files]
    test_names = [str(f) for f in test.index.files]
    exact = [_same_file(test_names[x.test], train_names[x.train]) for x in found]
    return found, exact, write_leaks_csv(found, train_names, test_names, exact, Path(out_dir) / "leaks.csv")


def leaks_explorer(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    train: LabelledImages,
    test: LabelledImages,
    leaks: Sequence[Leak],
    path: Path,
    *,
    map_method: str = "auto",
    seed: int = 0,
    workers: int = 2,
) -> tuple[Path, str]:
    """The explorer (:mod:`twinview.evaluate.explorer`) of both splits on one map: points coloured
    by split, the leaked test images and their training twins flagged ``leaks``, each image's
    nearest neighbours over both splits; thumbnails from one more decoding pass.

    Returns:
        The page, and the name of the map's method.
    """
    import itertools

    from twinview.evaluate.explorer import explore, thumbnail_batches

    n_train = len(train_features)
    names = [str(f) for f in train.index.files] + [str(f) for f in test.index.files]
    notes: list[list[str]] = [[] for _ in names]
    for x in leaks:
        notes[n_train + x.test].append(f"leaked: a near-duplicate of training image {Path(names[x.train]).name}")
        notes[x.train].append(f"has a near-duplicate in the test split: {Path(names[n_train + x.test]).name}")
    return explore(
        torch.cat([train_features, test_features]),
        names,
        itertools.chain(thumbnail_batches(train, workers=workers), thumbnail_batches(test, workers=workers)),
        np.repeat([0, 1], [n_train, len(test_features)]),
        [f"train ({n_train:,} images)", f"test ({len(test_features):,} images)"],
        "split",
        path,
        f"{len(test_features):,} test and {n_train:,} training images: {len(leaks)} leaked",
        flags={"leaks": sorted({r for x in leaks for r in (x.train, n_train + x.test)})},
        notes=["; ".join(n) for n in notes],
        map_method=map_method,
        seed=seed,
    )


def _same_file(a: str, b: str) -> bool:
    """Whether two names are files with the same bytes (rows of other sources: unknown, False)."""
    if not (Path(a).is_file() and Path(b).is_file()):
        return False
    return Path(a).stat().st_size == Path(b).stat().st_size and file_digest(a) == file_digest(b)


def knn_only(
    embedder: Embedder,
    reference: LabelledImages,
    query: LabelledImages,
    eval_cfg: EvalConfig,
    features_dir: Path | None = None,
) -> KnnResult:
    """The kNN part of :func:`evaluate` alone: features of both sets, then kNN top-1 / top-5 (the
    same values :func:`evaluate` returns in ``knn``).

    Raises:
        ValueError: If a set is unlabeled or the class names differ.
    """
    check_labelled_pair(reference, query)
    return knn_result(frozen_features(embedder, reference, query, features_dir), eval_cfg)


def frozen_features(
    embedder: Embedder, reference: LabelledImages, query: LabelledImages, cache_dir: Path | None = None
) -> FrozenFeatures:
    """Features and labels of both sets (from the cache in ``cache_dir`` when it has them)."""
    reference_x, reference_y = embedder.features(reference, cache_dir)
    query_x, query_y = embedder.features(query, cache_dir)
    return FrozenFeatures(reference_x, reference_y, query_x, query_y)


def knn_result(features: FrozenFeatures, eval_cfg: EvalConfig) -> KnnResult:
    """Weighted kNN top-1 / top-5 of the queries against the reference set, with its settings and sizes."""
    acc = knn_accuracy(
        features.reference,
        features.reference_labels,
        features.query,
        features.query_labels,
        k=eval_cfg.knn_k,
        temperature=eval_cfg.knn_temperature,
    )
    return KnnResult(
        acc["top1"], acc["top5"], eval_cfg.knn_k, eval_cfg.knn_temperature, len(features.reference), len(features.query)
    )


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


def feature_diagnostics(
    features: torch.Tensor, alignment: float, similarity: SimilarityStats | None = None
) -> Diagnostics:
    """Uniformity and effective rank of a (seeded) sample of the features, with a collapse warning.

    Args:
        features: ``(N, D)`` features.
        alignment: The view alignment measured for them (:func:`view_alignment`).
        similarity: Their norm and similarity distributions, when measured.
    """
    g = torch.Generator().manual_seed(0)
    sample = features[torch.randperm(len(features), generator=g)[:DIAGNOSTIC_SAMPLE]]
    return Diagnostics(
        uniformity(sample), effective_rank(sample), features.shape[1], collapse_warning(sample), alignment, similarity
    )


@torch.no_grad()
def view_alignment(embedder: Embedder, dataset: Images, augment: AugmentConfig) -> float:
    """Wang & Isola's alignment of two augmented views (seeded) of a sample of the data set's images.

    Args:
        embedder: The backbone, run in eval mode (its mode is restored), on its device.
        dataset: Source of up to ``ALIGNMENT_SAMPLE`` images, drawn with seed 0.
        augment: The views' recipe (made from the data set's ``image_size``).
    """
    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(dataset), generator=g)[:ALIGNMENT_SAMPLE].tolist()
    device, backbone = embedder.device, embedder.backbone
    images = torch.stack([dataset[i][0] for i in picks]).to(device)
    views = build_views(augment, dataset.image_size, embedder.mean, embedder.std, seed=0, device=device)
    view_a, view_b = views(images)[:2]
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
