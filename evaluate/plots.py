"""Plots a person can look at: training curves, a 2-D map of the embeddings, nearest neighbours,
for the unlabeled report near-duplicate pairs, clusters and similarity histograms, and the
label-efficiency curves of ``twinview finetune``.

All figures are PNG files written with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from twinview.evaluate.results import FinetuneResult

MAP_SAMPLE = 2000  # points on the embedding maps (t-SNE is quadratic)
MAP_LEGEND_MAX = 20  # colours named in the embedding map's legend


def training_curves(metrics_file: Path, out: Path) -> Path:
    """Loss and learning rate per logged step (and online kNN top-1 when logged) from metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "step"]
    knn = [r for r in records if "knn_top1" in r]
    panels = 3 if knn else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    marker = "o" if len(steps) < 3 else None  # a run of one or two log intervals is still visible
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", marker=marker)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange", marker=marker)
    axes[1].set(title="learning rate", xlabel="step", ylabel="lr")
    if knn:
        axes[2].plot([r["epoch"] for r in knn], [r["knn_top1"] for r in knn], marker="o", color="tab:green")
        axes[2].set(title="online kNN top-1", xlabel="epoch", ylabel="top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def embedding_map(
    features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], out: Path, seed: int = 0
) -> Path:
    """PCA and t-SNE of (a sample of) the embeddings, coloured by label, side by side."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(features), generator=g)[:MAP_SAMPLE]
    x = F.normalize(features[pick].float(), dim=1).numpy()
    y = labels[pick].numpy()
    pca = PCA(n_components=2, random_state=seed).fit_transform(x)
    tsne = TSNE(
        n_components=2, init="pca", perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), random_state=seed
    ).fit_transform(x)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, xy, title in ((axes[0], pca, "PCA"), (axes[1], tsne, "t-SNE")):
        for c in np.unique(y):
            m = y == c
            name = classes[c] if 0 <= c < len(classes) else str(c)
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(int(c) % cmap.N), label=name, alpha=0.7)
        ax.set(title=f"{title} of {len(x)} embeddings", xticks=[], yticks=[])
    if len(np.unique(y)) <= MAP_LEGEND_MAX:  # beyond, a legend would dwarf the maps (e.g. 45 clusters)
        axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def retrieval_grid(
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    query_x: torch.Tensor,
    gallery_images: torch.Tensor,
    gallery_labels: torch.Tensor,
    gallery_x: torch.Tensor,
    out: Path,
    k: int = 6,
) -> Path:
    """Each query (left) with its k nearest gallery images; green frame = same label, red = other."""
    sims = F.normalize(query_x.float(), dim=1) @ F.normalize(gallery_x.float(), dim=1).T
    top = sims.topk(k, dim=1).indices
    rows = len(query_images)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.4 * (k + 1), 1.5 * rows), squeeze=False)
    for i in range(rows):
        tiles = [(query_images[i], None)] + [
            (gallery_images[j], bool(gallery_labels[j] == query_labels[i])) for j in top[i]
        ]
        for ax, (img, same) in zip(axes[i], tiles, strict=True):
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            color = "black" if same is None else ("tab:green" if same else "tab:red")
            for spine in ax.spines.values():
                spine.set(color=color, linewidth=3)
        axes[i][0].set_ylabel("query", fontsize=8)
    fig.suptitle("nearest neighbours (green: same class, red: other)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


PAIRS_PER_ROW = 3  # duplicate pairs side by side in a row of pair_grid (6 tiles)
CLUSTER_ROWS = 12  # clusters shown by cluster_grid


def _tile(ax: plt.Axes, image: torch.Tensor, title: str = "", fontsize: int = 8) -> None:
    """Draws a ``(3, H, W)`` uint8 image without ticks, titled."""
    ax.imshow(image.permute(1, 2, 0).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _save(fig: plt.Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _message(text: str, out: Path, title: str = "") -> Path:
    """A figure that only says ``text`` (for an empty section)."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def self_neighbour_grid(
    query_images: torch.Tensor | Sequence[torch.Tensor],
    neighbour_images: Sequence[Sequence[torch.Tensor]],
    similarities: torch.Tensor,
    out: Path,
    title: str,
) -> Path:
    """Each row: a query (framed), then its k nearest images, each titled with its cosine similarity.

    Args:
        query_images: ``Q`` uint8 images ``(3, H, W)`` (or one ``(Q, 3, H, W)`` tensor).
        neighbour_images: Per query, its k neighbours' images, nearest first.
        similarities: ``(Q, k)`` their similarities to the query.
        out: The PNG file.
        title: The figure's title.
    """
    rows = len(query_images)
    if rows == 0:
        return _message("no queries", out, title)
    cols = 1 + max(len(n) for n in neighbour_images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
    for i in range(rows):
        _tile(axes[i][0], query_images[i], "query")
        for spine in axes[i][0].spines.values():
            spine.set(color="black", linewidth=3)
        for j, ax in enumerate(axes[i][1:]):
            if j < len(neighbour_images[i]):
                _tile(ax, neighbour_images[i][j], f"{float(similarities[i, j]):.2f}")
            else:
                ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def pair_grid(
    pairs_images: Sequence[tuple[torch.Tensor, torch.Tensor]],
    similarities: Sequence[float],
    exact: Sequence[bool],
    out: Path,
    title: str,
) -> Path:
    """Near-duplicate pairs, ``PAIRS_PER_ROW`` pairs (two tiles each) per row, captioned "0.97" or "exact".

    Args:
        pairs_images: The two uint8 images ``(3, H, W)`` of each pair.
        similarities: Cosine similarity of each pair.
        exact: Whether each pair's files are byte-identical (captioned "exact", framed red).
        out: The PNG file.
        title: The figure's title.

    Returns:
        ``out``; without pairs, a figure saying there are none.
    """
    if not pairs_images:
        return _message("no pairs above the threshold", out, title)
    rows = math.ceil(len(pairs_images) / PAIRS_PER_ROW)
    cols = min(PAIRS_PER_ROW, len(pairs_images))
    fig = plt.figure(figsize=(2.7 * cols, 1.5 * rows + 0.4), layout="constrained")
    # one subfigure per pair, so its caption is centred over its two tiles and pairs stand apart
    cells = fig.subfigures(rows, cols, squeeze=False, wspace=0.04)
    for p, ((left, right), sim, same) in enumerate(zip(pairs_images, similarities, exact, strict=True)):
        cell = cells[p // PAIRS_PER_ROW][p % PAIRS_PER_ROW]
        for ax, image in zip(cell.subplots(1, 2), (left, right), strict=True):
            _tile(ax, image)
            for spine in ax.spines.values():
                spine.set(color="tab:red" if same else "black", linewidth=2)
        cell.suptitle("exact" if same else f"{sim:.2f}", fontsize=9, color="tab:red" if same else "black")
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)  # constrained layout: no tight_layout
    plt.close(fig)
    return out


def image_grid(images: Sequence[torch.Tensor], captions: Sequence[str], out: Path, title: str, cols: int = 5) -> Path:
    """Images in rows of ``cols``, each captioned (e.g. the most unusual images and their scores).

    Returns:
        ``out``; without images, a figure saying there are none.
    """
    if not images:
        return _message("no images", out, title)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            _tile(ax, images[i], captions[i], fontsize=7)
        else:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def cluster_grid(cluster_images: Sequence[Sequence[torch.Tensor]], sizes: Sequence[int], out: Path) -> Path:
    """One row per cluster (the first ``CLUSTER_ROWS``): its images, labelled "cluster i (n images)".

    Args:
        cluster_images: Per cluster, the uint8 images ``(3, H, W)`` to show (e.g. its most central members).
        sizes: Members of each cluster.
        out: The PNG file.
    """
    shown = min(len(cluster_images), CLUSTER_ROWS)
    title = f"clusters, largest first ({len(cluster_images)})"
    if len(cluster_images) > CLUSTER_ROWS:
        title = f"the {CLUSTER_ROWS} largest of {len(cluster_images)} clusters"
    if shown == 0 or not any(cluster_images[:shown]):
        return _message("no clusters", out, title)
    cols = max(len(images) for images in cluster_images[:shown])
    fig, axes = plt.subplots(shown, cols, figsize=(1.3 * cols + 0.6, 1.4 * shown), squeeze=False)
    for i in range(shown):
        for j, ax in enumerate(axes[i]):
            if j < len(cluster_images[i]):
                _tile(ax, cluster_images[i][j])
            else:
                ax.set_axis_off()
        axes[i][0].set_ylabel(f"cluster {i}\n({sizes[i]} images)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def similarity_histogram(stats_by_model: dict[str, torch.Tensor], out: Path) -> Path:
    """Overlaid histograms of pairwise cosine similarities, one per model (e.g. pretrained, random init).

    Args:
        stats_by_model: Per model name, a ``(P,)`` sample of pairwise similarities (see
            ``label_free.pairwise_cosines``).
        out: The PNG file.
    """
    if not stats_by_model:
        return _message("no similarities", out, "pairwise cosine similarity")
    bins = np.linspace(-1.0, 1.0, 81).tolist()  # 80 bins of width 0.025
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, sims in stats_by_model.items():
        values = sims.detach().double().cpu().numpy()
        label = f"{name} (mean {values.mean():.2f})" if len(values) else name
        ax.hist(values, bins=bins, density=True, alpha=0.5, label=label)
    ax.set(title="pairwise cosine similarity", xlabel="cosine similarity", ylabel="density", xlim=(-1.0, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def label_efficiency(result: FinetuneResult, out: Path) -> Path:
    """Test top-1 against the labelled images used (log scale): fine-tuned from the pretrained
    backbone, from scratch, and the linear probe of the frozen pretrained features."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    x = [b.images for b in result.budgets]
    curves: list[tuple[str, list[float | None], str]] = [
        ("fine-tuned, pretrained", [b.pretrained.top1 for b in result.budgets], "tab:blue"),
        ("fine-tuned, from scratch", [b.scratch.top1 if b.scratch else None for b in result.budgets], "tab:orange"),
        ("linear probe, pretrained", [b.probe.top1 if b.probe else None for b in result.budgets], "tab:green"),
    ]
    for label, ys, color in curves:
        points = [(xi, yi) for xi, yi in zip(x, ys, strict=True) if yi is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{b.labels}\n({b.images})" for b in result.budgets])
    ax.minorticks_off()
    ax.set(xlabel="labelled training images", ylabel="test top-1", title=f"label efficiency: {result.backbone}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
