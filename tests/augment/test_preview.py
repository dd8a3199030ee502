"""`twinview preview`: a PNG grid whose size follows the layout and whose views differ from the originals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twinview.augment.preview import GAP, HEADER, MIN_CELL
from twinview.pretrain.app.cli import main


def _cells(png: Path, rows: int, columns: int, cell: int) -> np.ndarray:
    """Cuts the grid back into ``(rows, columns, cell, cell, 3)`` pixel blocks."""
    grid = np.asarray(Image.open(png).convert("RGB"))
    blocks = np.empty((rows, columns, cell, cell, 3), dtype=np.uint8)
    for i in range(rows):
        for j in range(columns):
            y, x = HEADER + GAP + i * (cell + GAP), GAP + j * (cell + GAP)
            blocks[i, j] = grid[y : y + cell, x : x + cell]
    return blocks


@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_preview_grid_has_the_layout_size_and_views_differ(image_folder: Path, tmp_path: Path, recipe: str) -> None:
    out = tmp_path / "views.png"
    assert main(["preview", "--data", str(image_folder), "--recipe", recipe, "--out", str(out), "--num", "5"]) == 0
    cell = 24 * -(-MIN_CELL // 24)  # 24 px images enlarged to >= MIN_CELL
    columns, rows = 3, 5
    assert Image.open(out).size == (columns * (cell + GAP) + GAP, HEADER + rows * (cell + GAP) + GAP)
    blocks = _cells(out, rows, columns, cell).astype(np.int16)
    for i in range(rows):
        assert np.abs(blocks[i, 1] - blocks[i, 0]).mean() > 2  # view 1 differs from the original
        assert np.abs(blocks[i, 2] - blocks[i, 0]).mean() > 2
        assert np.abs(blocks[i, 2] - blocks[i, 1]).mean() > 2


def test_preview_with_local_crops_adds_columns(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "multi.png"
    code = main(["preview", "--data", str(image_folder), "--out", str(out), "--num", "2", "augment.local_crops=3"])
    assert code == 0
    cell = 24 * -(-MIN_CELL // 24)
    assert Image.open(out).size[0] == 6 * (cell + GAP) + GAP  # original + 2 global + 3 local


def test_preview_unknown_recipe_is_a_clear_error(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["preview", "--data", str(image_folder), "--recipe", "dino", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "augment.recipe" in capsys.readouterr().err


def test_preview_takes_a_uint8_batch_and_undoes_the_normalisation(tmp_path: Path) -> None:
    import torch

    from twinview.augment.config import AugmentConfig, fill_recipe
    from twinview.augment.preview import preview

    augment = AugmentConfig()
    fill_recipe(augment)
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain = preview(images, augment, tmp_path / "plain.png", seed=3)
    normalised = preview(
        images, augment, tmp_path / "norm.png", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed=3
    )
    cell = 16 * -(-MIN_CELL // 16)
    a, b = (_cells(p, 3, 3, cell).astype(np.int16) for p in (plain, normalised))
    assert Image.open(plain).size == (3 * (cell + GAP) + GAP, HEADER + 3 * (cell + GAP) + GAP)
    assert np.array_equal(a[:, 0], images.permute(0, 2, 3, 1).numpy().repeat(cell // 16, 1).repeat(cell // 16, 2))
    assert np.abs(a - b).max() <= 1  # the same views, up to float rounding of (x - m) / s * s + m
