"""Evaluation of a frozen backbone on a labelled train/test pair: kNN, retrieval, verification,
diagnostics, linear probe, and the Markdown report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinview.evaluate.features import extract_features
from twinview.pretrain.data.cache import cache_key
from twinview.evaluate.knn import knn_accuracy
from twinview.evaluate.linear_probe import linear_probe, state_checksum
from twinview.evaluate.metrics import (
    alignment,
    collapse_warning,
    effective_rank,
    retrieval_metrics,
    uniformity,
    verification_metrics,
)
from twinview.pretrain.config import Config
from twinview.pretrain.data.sources import ImageFolderDataset
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
    probe: bool = False,
    plots_dir: Path | None = None,
    features_dir: Path | None = None,
    accelerator: Any | None = None,
) -> dict[str, Any]:
    """Extracts frozen features of both folders and scores them: kNN, retrieval (test queries against
    the train gallery), verification on test pairs, diagnostics and optionally a linear probe.

    Args:
        backbone: The (trained) backbone.
        cfg: Run config (image size, kNN k and temperature, batch size, workers).
        train_path: Labelled reference folder (class sub-folders).
        test_path: Labelled query folder with the same class names.
        device: Where to run; defaults to CUDA when available.
        probe: Also train and score a linear probe on the frozen features.
        plots_dir: Also draw the embedding map and a nearest-neighbour grid there.
        features_dir: Cache the extracted features of each split there, keyed by the folder, the
            image size and the backbone's weights, so a second evaluation skips the extraction.
        accelerator: With several processes (``accelerate launch``), extraction is split among them
            and gathered; every process then holds all features and computes the same metrics.

    Returns:
        ``knn_top1``, ``knn_top5``, ``k``, ``temperature``, ``num_train``, ``num_test``, and the
        ``retrieval``, ``verification``, ``diagnostics`` (and ``linear_probe``) sections, plus
        ``backbone_unchanged`` (the backbone's weights and buffers were not modified).

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
    kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device=device, accelerator=accelerator)
    before = state_checksum(backbone)
    train_x, train_y = _cached_features(backbone, before, train_set, mean, std, kwargs, features_dir)
    test_x, test_y = _cached_features(backbone, before, test_set, mean, std, kwargs, features_dir)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    result: dict[str, Any] = {
        "knn_top1": acc["top1"],
        "knn_top5": acc["top5"],
        "k": cfg.eval.knn_k,
        "temperature": cfg.eval.knn_temperature,
        "num_train": len(train_set),
        "num_test": len(test_set),
        "retrieval": retrieval_metrics(test_x, test_y, train_x, train_y),  # test queries, train gallery
        "verification": verification_metrics(*_pairs(test_x, test_y)),
        "diagnostics": {**_diagnostics(test_x), "alignment": _alignment(backbone, cfg, test_set, device)},
    }
    if probe:
        result["linear_probe"] = linear_probe(train_x, train_y, test_x, test_y, seed=cfg.train.seed)
    if plots_dir is not None:
        result["plots"] = _plots(Path(plots_dir), train_set, train_x, test_set, test_x)
    result["backbone_unchanged"] = state_checksum(backbone) == before
    return result


def _plots(folder: Path, train_set: Any, train_x: torch.Tensor, test_set: Any, test_x: torch.Tensor) -> list[str]:
    from twinview.evaluate import plots  # matplotlib only when plots are asked for

    folder.mkdir(parents=True, exist_ok=True)
    test_y = torch.tensor(test_set.index.labels)
    train_y = torch.tensor(train_set.index.labels)
    emb = plots.embedding_map(test_x, test_y, test_set.index.classes, folder / "embeddings.png")
    g = torch.Generator().manual_seed(0)
    queries = torch.randperm(len(test_set), generator=g)[:6]
    sims = torch.nn.functional.normalize(test_x[queries], dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    near = sims.topk(6, dim=1).indices.flatten().unique()  # only the gallery images the grid shows
    gallery = {int(j): train_set[int(j)][0] for j in near}
    gallery_idx = torch.tensor(sorted(gallery))
    grid = plots.retrieval_grid(
        torch.stack([test_set[int(i)][0] for i in queries]), test_y[queries], test_x[queries],
        torch.stack([gallery[int(j)] for j in gallery_idx]), train_y[gallery_idx], train_x[gallery_idx],
        folder / "neighbours.png",
    )
    return [str(emb), str(grid)]


def _cached_features(backbone: nn.Module, checksum: float, dataset: Any, mean: Any, std: Any, kwargs: dict[str, Any],
                     folder: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    if folder is None:
        return extract_features(backbone, dataset, mean, std, **kwargs)
    # the files (paths, sizes, mtimes, labels) and the weights: a changed folder or backbone gets new features
    key = hashlib.sha256(f"{cache_key(dataset.index, dataset.image_size)}:{checksum!r}".encode()).hexdigest()[:16]
    path = Path(folder) / f"{Path(dataset.index.root).name}-{key}.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["features"], cached["labels"]
    features, labels = extract_features(backbone, dataset, mean, std, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": features, "labels": labels}, tmp)
    tmp.replace(path)
    return features, labels


DIAGNOSTIC_SAMPLE = 2000
VERIFICATION_PAIRS = 20000


ALIGNMENT_SAMPLE = 512


@torch.no_grad()
def _alignment(backbone: nn.Module, cfg: Config, dataset: Any, device: torch.device) -> float:
    """Wang & Isola's alignment of two augmented views (the run's recipe, seeded) of test images."""
    from twinview.augment.views import build_views

    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(dataset), generator=g)[:ALIGNMENT_SAMPLE].tolist()
    images = torch.stack([dataset[i][0] for i in picks]).to(device)
    mean, std = normalization_stats(backbone)
    view_a, view_b = build_views(cfg.augment, cfg.data.image_size, mean, std, seed=0, device=device)(images)[:2]
    was_training = backbone.training
    backbone.eval()
    result = alignment(backbone(view_a).float(), backbone(view_b).float())
    backbone.train(was_training)
    return result


def _diagnostics(features: torch.Tensor) -> dict[str, Any]:
    """Uniformity and effective rank of (a sample of) the test features, with a collapse warning."""
    g = torch.Generator().manual_seed(0)
    sample = features[torch.randperm(len(features), generator=g)[:DIAGNOSTIC_SAMPLE]]
    return {"uniformity": uniformity(sample), "effective_rank": effective_rank(sample), "dims": features.shape[1],
            "collapse_warning": collapse_warning(sample)}


def _pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of random genuine and impostor pairs of the test set, about half each."""
    g = torch.Generator().manual_seed(0)
    n = len(labels)
    a = torch.randint(0, n, (4 * VERIFICATION_PAIRS,), generator=g)
    b = torch.randint(0, n, (4 * VERIFICATION_PAIRS,), generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    same = labels[a] == labels[b]
    genuine, impostor = same.nonzero().squeeze(1)[:VERIFICATION_PAIRS], (~same).nonzero().squeeze(1)[:VERIFICATION_PAIRS]
    pick = torch.cat([genuine, impostor])
    x = torch.nn.functional.normalize(features, dim=1)
    return (x[a[pick]] * x[b[pick]]).sum(dim=1), same[pick]


def write_report(result: dict[str, Any], path: Path, title: str) -> Path:
    """A Markdown report of an evaluation (what ``twinview evaluate`` writes as RUN_DIR/report.md)."""
    lines = [f"# {title}", ""]
    for name, r in result.items():
        lines += [f"## {name}", "", "| metric | value |", "| --- | --- |",
                  f"| kNN top-1 / top-5 (k={r['k']}, T={r['temperature']}) | {r['knn_top1']:.4f} / {r['knn_top5']:.4f} |"]
        if "linear_probe" in r:
            p = r["linear_probe"]
            lines.append(f"| linear probe top-1 / top-5 (wd {p['weight_decay']:g}) | {p['probe_top1']:.4f} / {p['probe_top5']:.4f} |")
        lines += [f"| {k} | {v:.4f} |" for k, v in r["retrieval"].items()]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["verification"].items()]
        d = r["diagnostics"]
        lines += [f"| alignment (two views) | {d['alignment']:.4f} |", f"| uniformity | {d['uniformity']:.4f} |",
                  f"| effective rank (of {d['dims']}) | {d['effective_rank']:.1f} |",
                  f"| images train / test | {r['num_train']} / {r['num_test']} |", ""]
        if d["collapse_warning"]:
            lines += [f"**Warning:** {d['collapse_warning']}.", ""]
    path.write_text("\n".join(lines))
    return path


def random_init_backbone(cfg: Config) -> nn.Module:
    """A randomly initialised copy of the run's backbone (same architecture, seed ``train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    return create_backbone(cfg.model)
