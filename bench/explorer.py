"""The embedding explorer at 50,000 images: what it costs to make, and how fast the page draws.

Synthetic data shaped like a photo collection: ``--rows`` 512-d embeddings around 50 centres and one
64 px thumbnail per row (a flat colour per centre with noise, so the JPEG sheets are not trivially
small). Times, on this host: the 2-D map (``--map``: pca, tsne or umap), the exact 10 nearest
neighbours of every row, the sprite sheets and the page; then, in headless chromium (Debian's), the
time from navigation to the first drawn frame of all points (``explorer.firstPaint()``, the
page's ``performance.now()`` when the canvas was first drawn, median of ``--loads`` loads), the
page's load event, and the median time of a redraw during a pan (60 drag events: the page's own drawing time, and the
time from sending the event over DevTools to the next frame).
Prints one JSON object with the host kind.

Usage: python bench/explorer.py [--rows 50000] [--map pca] [--loads 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from host import host_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/browser.py: the DevTools harness
from tests.browser import BrowserPage
from twinview.evaluate.explorer import (
    ExplorerPoints,
    nearest_neighbours,
    project,
    write_explorer,
    write_sprites,
)


def synthetic(rows: int, dims: int, centres: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(centres, dims, generator=g)
    labels = torch.randint(0, centres, (rows,), generator=g)
    return centre[labels] + 0.6 * torch.randn(rows, dims, generator=g), labels.numpy()


def thumbnails(labels: np.ndarray, side: int, seed: int, batch: int = 4096):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(labels.max() + 1, 3))
    for start in range(0, len(labels), batch):
        part = labels[start : start + batch]
        base = colours[part][:, None, None, :]
        noise = rng.integers(-40, 40, size=(len(part), side, side, 3))
        yield np.clip(base + noise, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--map", default="pca", choices=("pca", "tsne", "umap"))
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--out", type=Path, help="keep the page here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    features, labels = synthetic(args.rows, args.dims, 50, 0)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    layout = project(features, args.map)
    seconds["map"] = time.perf_counter() - started
    started = time.perf_counter()
    neighbours, sims = nearest_neighbours(features, 10)
    seconds["neighbours"] = time.perf_counter() - started
    page = out / "explorer.html"
    started = time.perf_counter()
    sprites = write_sprites(thumbnails(labels, 64, 0), page)
    seconds["sprites"] = time.perf_counter() - started
    names = [f"/photos/2026/roll-{i // 1000:03d}/IMG_{i:06d}.jpg" for i in range(args.rows)]
    points = ExplorerPoints(
        names,
        layout,
        neighbours,
        sims,
        labels,
        [f"{g} ({int((labels == g).sum())} images)" for g in range(labels.max() + 1)],
        flags={"duplicates": list(range(0, args.rows, 97)), "outliers": list(range(5, args.rows, 211))},
    )
    started = time.perf_counter()
    write_explorer(points, sprites, page, f"explorer benchmark, {args.rows:,} points")
    seconds["page"] = time.perf_counter() - started
    chromium = shutil.which("chromium")
    browser: dict[str, object] = {"skipped": "chromium is not installed"}
    if chromium is not None:
        first, loaded, redraw, round_trip, problems = [], [], [], [], []
        for attempt in range(args.loads):
            with BrowserPage(chromium, out / f"profile-{attempt}", page) as view:
                view.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                first.append(view.evaluate("explorer.firstPaint()"))
                loaded.append(view.loaded_s * 1000)
                x, y = view.evaluate("explorer.position(0)")
                view.mouse("mousePressed", x, y)
                times, rounds = [], []
                for step in range(60):
                    t0 = time.perf_counter()
                    view.mouse("mouseMoved", x + 5 + step, y + step / 2, buttons=1)
                    view.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
                    rounds.append((time.perf_counter() - t0) * 1000)
                    times.append(view.evaluate("explorer.drawMs()"))
                view.mouse("mouseReleased", x + 70, y + 30)
                redraw.append(statistics.median(times))
                round_trip.append(statistics.median(rounds))
                problems += view.problems
        browser = {
            "first_paint_ms": round(statistics.median(first)),
            "first_paint_ms_each": [round(v) for v in first],
            "load_event_ms": round(statistics.median(loaded)),
            "pan_redraw_ms": round(statistics.median(redraw), 1),
            "pan_event_to_frame_ms": round(statistics.median(round_trip), 1),
            "console_problems": problems,
        }
    sheets = sorted((out / "explorer_files").glob("*.jpg"))
    print(
        json.dumps(
            {
                "benchmark": "explorer",
                "host": host_kind(),
                "rows": args.rows,
                "map": layout.method,
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "page_mb": round(page.stat().st_size / 1e6, 1),
                "sprite_sheets": len(sheets),
                "sprites_mb": round(sprites.nbytes / 1e6, 1),
                "browser": browser,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
