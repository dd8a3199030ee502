"""A PNG grid of images and their views, so a person can check a recipe by eye.

``twinview preview --data DIR --recipe simclr --out views.png`` loads the images and calls
:func:`preview`: one row per image, the original first, then each view as the model would see it
before normalisation (global views, then local ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from twinview.augment.config import AugmentConfig
from twinview.augment.views import build_views

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
    for j, (column, title) in enumerate(zip(columns, titles, strict=True)):
        x = GAP + j * (cell + GAP)
        draw.text((x + 2, 3), title, fill="black")
        s = column.shape[-1] * scale
        scaled = F.interpolate(column.float(), scale_factor=scale, mode="nearest") if scale > 1 else column.float()
        pixels = scaled.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i in range(n):
            offset = (cell - s) // 2  # centre smaller (local) views in their cell
            canvas.paste(Image.fromarray(pixels[i]), (x + offset, HEADER + GAP + i * (cell + GAP) + offset))
    return canvas


def preview(
    images: torch.Tensor,
    augment: AugmentConfig,
    out: Path,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> Path:
    """Renders images with their views into a PNG, one row per image.

    Args:
        images: ``(N, 3, S, S)`` uint8 images; the views are made at ``S`` (``data.image_size``).
        augment: The recipe of the views.
        out: Output PNG path (parent folders are created).
        mean: Normalisation mean the views are made with (undone for display).
        std: Normalisation std the views are made with (undone for display). The defaults leave
            the views in [0, 1], as the model sees them before normalisation.
        seed: Seeds the views.

    Returns:
        ``out``.
    """
    views = build_views(augment, images.shape[-1], mean, std, seed=seed)(images)
    shown = [unnormalize(v, mean, std) for v in views]
    titles = ["original"] + [f"view {i + 1}" for i in range(2)] + [f"local {i + 1}" for i in range(len(views) - 2)]
    grid = render_grid(images.float() / 255, shown, titles)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def unnormalize(views: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``views * std + mean`` per channel: normalised views back in [0, 1] units (exact for 0 / 1)."""
    std_t = torch.tensor(std, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    return views.float() * std_t + mean_t
