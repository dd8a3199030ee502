"""The explorer's data: neighbours as search ranks them, the 2-D map, sprite sheets, the page's JSON."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from twinview.evaluate.embedding_file import write_embedding_file
from twinview.evaluate.explorer import (
    ExplorerPoints,
    MapLayout,
    nearest_neighbours,
    page_data,
    project,
    write_explorer,
    write_sprites,
)
from twinview.evaluate.search import search


def test_neighbours_are_the_brute_force_ranking_without_the_row_itself() -> None:
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    rows, sims = nearest_neighbours(x, k=7, block=64)  # several blocks, the last one partial

    cosine = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    for i in range(300):
        others = [j for j in range(300) if j != i]
        expected = sorted(others, key=lambda j: -float(cosine[i, j]))[:7]
        assert rows[i].tolist() == expected
        assert np.allclose(sims[i], cosine[i, expected].numpy(), atol=1e-6)


def test_neighbours_equal_what_search_answers_for_the_row(tmp_path: Path) -> None:
    x = torch.randn(120, 32, generator=torch.Generator().manual_seed(1))
    names = [f"img{i}.jpg" for i in range(120)]
    index = write_embedding_file(tmp_path / "e.parquet", iter([(names, x.numpy(), None)]), 32, "float32", {}, 120)
    rows, sims = nearest_neighbours(x, k=5)

    hits = search(x[:10], index, k=6)  # the row itself comes first, then its neighbours
    assert hits.rows[:, 0].tolist() == list(range(10))
    assert hits.rows[:, 1:].tolist() == rows[:10].tolist()
    assert np.allclose(hits.similarities[:, 1:].numpy(), sims[:10], atol=1e-5)


def test_neighbours_of_a_tiny_set() -> None:
    rows, sims = nearest_neighbours(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), k=10)
    assert rows.tolist() == [[1], [0]] and sims.shape == (2, 1)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_the_map_fills_the_unit_square_and_keeps_clusters_apart(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 64, generator=g) * 4
    x = torch.cat([c + 0.1 * torch.randn(40, 64, generator=g) for c in centres])
    layout = project(x, method)

    assert layout.xy.shape == (120, 2) and layout.xy.dtype == np.float32
    assert layout.xy.min() >= 0 and layout.xy.max() <= 1 and np.isclose(np.ptp(layout.xy, axis=0).max(), 1)
    assert layout.method.startswith({"pca": "PCA", "tsne": "t-SNE"}[method])
    # every point is nearer its own cluster's mean than another cluster's
    means = np.stack([layout.xy[i * 40 : (i + 1) * 40].mean(axis=0) for i in range(3)])
    nearest = np.linalg.norm(layout.xy[:, None] - means[None], axis=2).argmin(axis=1)
    assert (nearest == np.repeat(np.arange(3), 40)).all()


def test_the_map_method_is_checked_and_auto_names_what_it_used() -> None:
    x = torch.randn(30, 8)
    with pytest.raises(ValueError, match="one of auto, umap, tsne, pca"):
        project(x, "mds")
    assert project(x, "auto").method.split()[0] in ("UMAP", "t-SNE")


def _colours(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 3), dtype=np.uint8)


def _flat_thumbs(colours: np.ndarray, side: int, batch: int = 7):  # type: ignore[no-untyped-def]
    for start in range(0, len(colours), batch):
        yield np.broadcast_to(
            colours[start : start + batch, None, None, :], (len(colours[start : start + batch]), side, side, 3)
        )


def _sheet(url: str, page: Path) -> np.ndarray:
    if url.startswith("data:image/jpeg;base64,"):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return np.asarray(Image.open(page.parent / url).convert("RGB"))


@pytest.mark.parametrize("inline", [True, False])
def test_sprites_hold_each_thumbnail_at_its_tile(tmp_path: Path, inline: bool) -> None:
    colours = _colours(40)  # 2 sheets of 5 x 5 tiles, the second partly filled
    page = tmp_path / "explorer.html"
    sprites = write_sprites(_flat_thumbs(colours, 16), page, tiles=5, inline_bytes=1 << 30 if inline else 0)

    assert (sprites.count, sprites.side, sprites.tiles, len(sprites.urls)) == (40, 16, 5, 2)
    assert (tmp_path / "explorer_files").is_dir() != inline
    for i, colour in enumerate(colours):
        sheet = _sheet(sprites.urls[i // 25], page)
        r, c = divmod(i % 25, 5)
        tile = sheet[r * 16 + 3 : (r + 1) * 16 - 3, c * 16 + 3 : (c + 1) * 16 - 3].reshape(-1, 3).mean(axis=0)
        assert np.abs(tile - colour).max() < 12, i  # JPEG keeps a flat tile's colour


def test_sprites_written_again_replace_the_old_sheets(tmp_path: Path) -> None:
    page = tmp_path / "explorer.html"
    write_sprites(_flat_thumbs(_colours(60), 8), page, tiles=2, inline_bytes=0)
    write_sprites(_flat_thumbs(_colours(3), 8), page, tiles=2, inline_bytes=0)
    assert len(list((tmp_path / "explorer_files").iterdir())) == 1


def _points(names: list[str], k: int = 2) -> ExplorerPoints:
    n = len(names)
    neighbours = np.array([[(i + j + 1) % n for j in range(k)] for i in range(n)])
    return ExplorerPoints(
        names,
        MapLayout(np.random.default_rng(0).random((n, 2)).astype(np.float32), "PCA (scikit-learn)"),
        neighbours,
        np.full((n, k), 0.5, dtype=np.float32),
        np.zeros(n, dtype=np.int64),
        ["0 (all)"],
        flags={"duplicates": [2, 0], "outliers": []},
    )


def test_page_data_shortens_names_and_refuses_mismatched_parts(tmp_path: Path) -> None:
    names = ["/data/photos/a/1.jpg", "/data/photos/b/2.jpg", "/data/photos/a/3.jpg"]
    sprites = write_sprites(_flat_thumbs(_colours(3), 8), tmp_path / "p.html")
    data = page_data(_points(names), sprites)

    assert data["prefix"] == "/data/photos/" and data["names"] == ["a/1.jpg", "b/2.jpg", "a/3.jpg"]
    assert data["k"] == 2 and data["neighbours"] == [1, 2, 2, 0, 0, 1] and data["flags"]["duplicates"] == [0, 2]
    fewer = write_sprites(_flat_thumbs(_colours(2), 8), tmp_path / "q.html")
    with pytest.raises(ValueError, match="3 names, 3 map points, 3 groups, 3 neighbour rows and 2 thumbnails"):
        page_data(_points(names), fewer)


def test_a_name_cannot_end_the_pages_data_block(tmp_path: Path) -> None:
    names = ["x/</script><script>alert(1)</script>.jpg", "x/<!--<script>b.jpg"]
    sprites = write_sprites(_flat_thumbs(_colours(2), 8), tmp_path / "p.html")
    page = write_explorer(_points(names, k=1), sprites, tmp_path / "p.html", 't <&> "q"').read_text()

    block = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S)
    assert block is not None and "<" not in block.group(1)
    assert json.loads(block.group(1))["names"] == ["</script><script>alert(1)</script>.jpg", "<!--<script>b.jpg"]
    assert "<title>t &lt;&amp;&gt; &quot;q&quot;</title>" in page
