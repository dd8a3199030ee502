"""explorer.html in headless chromium with real mouse events: hovering a point shows that image's
thumbnail (its pixels, on a screenshot), a click lists its nearest neighbours and a click on one of
them moves there, the flag filters hide the other points, the map is drawn, and nothing is logged
to the console, with the sprite sheets inlined and beside the page.

They need Debian's chromium, which .ci/run installs; without it they skip, saying why.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.browser import BrowserPage
from twinview.evaluate.explorer import ExplorerPoints, MapLayout, nearest_neighbours, write_explorer, write_sprites

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

SIDE = 8  # points on an 8 x 8 grid, 64 images
N = SIDE * SIDE
Explorer = tuple[Path, ExplorerPoints, np.ndarray]  # the page, what it shows, each image's colour
GROUP_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]  # the page's first four


def _colours() -> np.ndarray:
    """A distinct flat colour per image, far from white and grey."""
    rng = np.random.default_rng(3)
    return rng.integers(20, 236, size=(N, 3)).astype(np.uint8)


def _thumbs(colours: np.ndarray) -> Iterator[np.ndarray]:
    yield np.ascontiguousarray(np.broadcast_to(colours[:, None, None, :], (N, 32, 32, 3)))


def _page(folder: Path, inline: bool) -> tuple[Path, ExplorerPoints, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij"), axis=-1).reshape(-1, 2)
    xy = (grid / (SIDE - 1)).astype(np.float32)
    features = torch.randn(N, 16, generator=torch.Generator().manual_seed(0))
    neighbours, sims = nearest_neighbours(features, k=5)
    colours = _colours()
    points = ExplorerPoints(
        [f"/photos/set/img_{i:02d}.jpg" for i in range(N)],
        MapLayout(xy, "PCA (scikit-learn)"),
        neighbours,
        sims,
        np.arange(N) % 4,
        [f"{g} (16 images)" for g in range(4)],
        flags={"duplicates": [3, 10, 42], "outliers": [7], "leaks": []},
        notes=[f"note {i}" for i in range(N)],
    )
    page = folder / "explorer.html"
    sprites = write_sprites(_thumbs(colours), page, tiles=5, inline_bytes=1 << 30 if inline else 0)
    return write_explorer(points, sprites, page, "explorer test"), points, colours


def _rect(view: BrowserPage, selector: str) -> dict[str, float]:
    box = view.evaluate(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
    return json.loads(box)


def _click(view: BrowserPage, selector: str) -> None:
    """A real mouse click at the centre of the element."""
    box = _rect(view, selector)
    view.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def _mean_colour(view: BrowserPage, rect: dict[str, float], inset: float = 4) -> np.ndarray:
    clip = {
        "x": rect["x"] + inset,
        "y": rect["y"] + inset,
        "width": rect["width"] - 2 * inset,
        "height": rect["height"] - 2 * inset,
    }
    shot = np.asarray(Image.open(io.BytesIO(view.screenshot(clip))).convert("RGB")).astype(np.float64)
    return shot.reshape(-1, 3).mean(axis=0)


def _frame(view: BrowserPage) -> None:
    """Waits until every sprite sheet is decoded (sheets beside the page load on first use) and
    two frames are drawn."""
    view.evaluate(
        "Promise.all(Array.from(document.styleSheets).flatMap(s => Array.from(s.cssRules))"
        ".map(r => r.style && r.style.backgroundImage).filter(b => b && b.startsWith('url('))"
        ".map(b => { const i = new Image(); i.src = b.slice(5, -2); return i.decode(); }))"
    )
    view.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


@pytest.fixture(scope="module", params=[True, False], ids=["inline", "beside"])
def explorer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    return _page(tmp_path_factory.mktemp("explorer"), request.param)


def test_hover_shows_the_images_own_thumbnail(chromium: str, explorer: Explorer, tmp_path: Path) -> None:
    page, _, colours = explorer
    with BrowserPage(chromium, tmp_path / "profile", page) as view:
        _frame(view)
        for i in (0, 27, 63):  # first sheet, second sheet, the last (partly filled) sheet
            x, y = view.evaluate(f"explorer.position({i})")
            view.mouse("mouseMoved", x + 1, y - 1)
            _frame(view)
            assert view.evaluate("document.getElementById('tip').style.display") == "block"
            assert view.evaluate("document.getElementById('tip').dataset.row") == str(i)
            assert view.evaluate("document.getElementById('tip-name').textContent") == f"img_{i:02d}.jpg"
            seen = _mean_colour(view, _rect(view, "#tip-thumb"))
            assert np.abs(seen - colours[i]).max() < 16, (i, seen, colours[i])
        canvas = _rect(view, "#canvas")
        view.mouse("mouseMoved", canvas["x"] + 3, canvas["y"] + 3)  # the canvas's empty corner: no tooltip
        assert view.evaluate("document.getElementById('tip').style.display") == "none"
        assert view.problems == []


def test_click_lists_the_nearest_neighbours_and_follows_them(chromium: str, explorer: Explorer, tmp_path: Path) -> None:
    page, points, colours = explorer
    with BrowserPage(chromium, tmp_path / "profile", page) as view:
        _frame(view)
        x, y = view.evaluate("explorer.position(10)")
        view.click(x, y)
        assert view.evaluate("explorer.selected()") == 10
        rows = view.evaluate("Array.from(document.querySelectorAll('#neighbours li'), li => Number(li.dataset.row))")
        assert rows == points.neighbours[10].tolist()
        sims = view.evaluate("Array.from(document.querySelectorAll('#neighbours .sim'), s => Number(s.textContent))")
        assert np.allclose(sims, points.similarities[10], atol=1e-4)
        selected = view.evaluate("document.getElementById('selected').textContent")
        assert "img_10.jpg" in selected and "cluster 2 (16 images)" in selected and "duplicate" in selected
        assert "note 10" in selected
        big = _mean_colour(view, _rect(view, "#selected .thumb"))
        assert np.abs(big - colours[10]).max() < 16

        _click(view, "#neighbours li:nth-child(2)")  # a real click on the second neighbour
        assert view.evaluate("explorer.selected()") == int(points.neighbours[10][1])
        view.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape"})
        assert view.evaluate("explorer.selected()") == -1
        assert view.problems == []


def test_flag_filters_hide_the_other_points(chromium: str, explorer: Explorer, tmp_path: Path) -> None:
    page, _, _ = explorer
    with BrowserPage(chromium, tmp_path / "profile", page) as view:
        _frame(view)
        assert view.evaluate("document.getElementById('count').textContent") == "64 of 64 images"
        assert view.evaluate("document.getElementById('flag-leaks').disabled") is True  # none to show
        _click(view, "#flag-duplicates")
        assert view.evaluate("document.getElementById('count').textContent") == "3 of 64 images"
        x, y = view.evaluate("explorer.position(11)")  # not a duplicate: hidden, so no tooltip
        view.mouse("mouseMoved", x, y)
        assert view.evaluate("document.getElementById('tip').style.display") == "none"
        x, y = view.evaluate("explorer.position(42)")
        view.mouse("mouseMoved", x, y)
        assert view.evaluate("document.getElementById('tip').dataset.row") == "42"
        _click(view, "#flag-outliers")  # duplicates or outliers
        assert view.evaluate("document.getElementById('count').textContent") == "4 of 64 images"
        assert view.problems == []


def test_the_map_is_drawn(chromium: str, explorer: Explorer, tmp_path: Path) -> None:
    page, _, _ = explorer
    with BrowserPage(chromium, tmp_path / "profile", page) as view:
        _frame(view)
        assert view.evaluate("document.body.dataset.ready") == "1" and view.evaluate("explorer.firstPaint()") > 0
        shot = np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(np.int16)
        canvas = _rect(view, "#canvas")
        area = shot[
            int(canvas["y"]) : int(canvas["y"] + canvas["height"]),
            int(canvas["x"]) : int(canvas["x"] + canvas["width"]),
        ]
        for colour in GROUP_COLOURS:  # 16 points of each cluster's colour, 3 x 3 px each
            assert (np.abs(area - np.array(colour)).max(axis=2) <= 3).sum() >= 16 * 9 * 0.9, colour
        assert view.problems == []
