"""A PNG grid of images and their views, so a person can check a recipe in seconds.

``twinview preview --data DIR --recipe simclr --out views.png``: one row per image, the original
first, then each view as the model would see it before normalisation (global views, then local ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from twinview.augment.views import build_views
from twinview.pretrain.config import Config
from twinview.pretrain.data.sources import ImageFolderDataset

MIN_CELL = 96  # small images are enlarged (nearest neighbour) to at least this many pixels
GAP = 4
HEADER = 18


def render_grid(originals: torch.Tensor, views: Sequence[torch.Tensor], titles: Sequence[str]) -> Image.Image:
    """Lays out ``[original, view_1, ...]`` rows on a white canvas with a title row.

    Args:
        originals: ``(N, 3, H, W)`` images in [0, 1].
        views: Each ``(N, 3, S_v, S_v)`` in [0, 1]; local views may be smaller than global ones.
        titles: One title per column (original first).

    Returns:
        The RGB grid image.
    """
    columns = [originals, *views]
    side = max(c.shape[-1] for c in columns)
    scale = max(1, -(-MIN_CELL // side))  # ceil
    cell = side * scale
    n = originals.shape[0]
    width = len(columns) * (cell + GAP) + GAP
    height = HEADER + n * (cell + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (column, title) in enumerate(zip(columns, titles)):
        x = GAP + j * (cell + GAP)
        draw.text((x + 2, 3), title, fill="black")
        s = column.shape[-1] * scale
        pixels = F.interpolate(column.float(), scale_factor=scale, mode="nearest") if scale > 1 else column.float()
        pixels = pixels.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i in range(n):
            offset = (cell - s) // 2  # centre smaller (local) views in their cell
            canvas.paste(Image.fromarray(pixels[i]), (x + offset, HEADER + GAP + i * (cell + GAP) + offset))
    return canvas


def preview(cfg: Config, out: Path, num_images: int = 8, seed: int = 0) -> Path:
    """Renders ``num_images`` images of ``cfg.data.path`` with their views into a PNG.

    Args:
        cfg: A resolved config (data and augment sections are used).
        out: Output PNG path (parent folders are created).
        num_images: Rows of the grid (drawn at random with ``seed``, at most the folder's size).
        seed: Seeds the choice of images and the views.

    Returns:
        ``out``.
    """
    dataset = ImageFolderDataset(cfg.data.path, cfg.data.image_size)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=g)[: min(num_images, len(dataset))].tolist()
    images = torch.stack([dataset[i][0] for i in picks])  # (N, 3, H, W) uint8
    # mean 0 / std 1 leaves the views in [0, 1], as the model sees them before normalisation
    views = build_views(cfg.augment, cfg.data.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), seed=seed)(images)
    titles = ["original"] + [f"view {i + 1}" for i in range(2)] + [f"local {i + 1}" for i in range(len(views) - 2)]
    grid = render_grid(images.float() / 255, views, titles)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
