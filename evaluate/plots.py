"""Plots a person can look at: training curves, a 2-D map of the embeddings, nearest neighbours.

All figures are PNG files written with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import json
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

MAP_SAMPLE = 2000  # points on the embedding maps (t-SNE is quadratic)


def training_curves(metrics_file: Path, out: Path) -> Path:
    """Loss and learning rate per logged step (and online kNN top-1 when logged) from metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "step"]
    knn = [r for r in records if "knn_top1" in r]
    panels = 3 if knn else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
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
