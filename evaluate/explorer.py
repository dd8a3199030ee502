"""The embedding explorer: one HTML page with a 2-D map of every embedding that a person can click.

Each image is a point of a 2-D map of its embedding (:func:`project`: UMAP from ``umap-learn`` where
it is installed, else scikit-learn's t-SNE up to :data:`TSNE_MAX_ROWS` images and PCA beyond; the
page says which). The page (``explorer.html``, :func:`write_explorer`) draws the points on a canvas
(50,000 points stay smooth: one ``fillRect`` per point, no DOM node per point), shows an image's
thumbnail on hover, and on click lists its k nearest other images by cosine similarity of the
embeddings (:func:`nearest_neighbours`: the ranking ``twinview search`` gives for the image, without
the image itself; from 100,000 images on a CPU, faiss's approximate graph), its group (k-means
cluster or class) and its flags (near-duplicate, outlier, leak), with filters by group and flag.

Thumbnails are JPEG sprite sheets (:func:`write_sprites`): inlined into the page as ``data:`` URLs
up to :data:`INLINE_BYTES`, so small sets give one file to send; beyond, the sheets lie in
``explorer_files/`` beside the page. Nothing is fetched from the network when the page is viewed.

Why our own page rather than a library: FiftyOne's App and LightlyStudio are servers with their own
databases, and the plotting libraries that make standalone HTML (plotly, bokeh) draw one SVG node or
WebGL point per image without thumbnails from a sprite sheet; a canvas and ~300 lines of script do
what the explorer needs and add no dependency.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from twinview.evaluate.config import MAP_METHODS, TSNE_MAX_ROWS
from twinview.evaluate.neighbours import NeighbourGraph, neighbour_graph

THUMB_SIDE = 64  # pixels of a thumbnail in the sprite sheets (smaller images keep their own side)
SHEET_TILES = 32  # a sheet is 32 x 32 thumbnails (2,048 px square at 64 px)
INLINE_BYTES = 8 << 20  # sprite sheets up to this total are inlined into the page
NEIGHBOURS = 10  # nearest images listed on click
# The page holds every point's name, position and neighbours as JSON (8.6 MB for 50,000) and a
# browser parses it at once: beyond this many images it is not written (use search and the CSVs).
MAX_ROWS = 200_000
JPEG_QUALITY = 80
FILES_DIR_SUFFIX = "_files"  # explorer.html -> explorer_files/


@dataclass(frozen=True)
class MapLayout:
    """Where each embedding is drawn.

    Attributes:
        xy: ``(N, 2)`` float32 in ``[0, 1]``, the same scale on both axes.
        method: What made it, for the page (e.g. ``t-SNE (scikit-learn)``).
    """

    xy: np.ndarray
    method: str


def _has_umap() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project(features: torch.Tensor, method: str = "auto", seed: int = 0) -> MapLayout:
    """A 2-D map of the L2-normalised embeddings.

    Args:
        features: ``(N, D)`` embeddings.
        method: ``umap`` (needs ``umap-learn``), ``tsne``, ``pca``, or ``auto``: UMAP where
            installed, else t-SNE up to :data:`TSNE_MAX_ROWS` rows, else PCA.
        seed: Seed of the projection.

    Raises:
        ValueError: An unknown method, or ``umap`` without ``umap-learn``.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {', '.join(MAP_METHODS)}, got '{method}'.")
    x = F.normalize(features.float(), dim=1).cpu().numpy()
    n, d = x.shape
    if method == "auto":
        method = "umap" if _has_umap() else ("tsne" if n <= TSNE_MAX_ROWS else "pca")
    if method == "umap" and not _has_umap():
        raise ValueError("map method 'umap' needs umap-learn: pip install umap-learn (or use tsne / pca).")
    if n < 4:  # too few for a neighbourhood method: PCA (or the points themselves)
        method = "pca"
    if method == "umap":
        import umap

        xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
        name = "UMAP (umap-learn, cosine)"
    elif method == "tsne":
        reduced = PCA(n_components=min(50, d, n), random_state=seed).fit_transform(x) if d > 50 else x
        perplexity = min(30.0, max(2.0, (n - 1) / 3))
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(reduced)
        name = f"t-SNE (scikit-learn, perplexity {perplexity:g}, of the first {min(50, d, n)} principal components)"
        if d <= 50:
            name = f"t-SNE (scikit-learn, perplexity {perplexity:g})"
    else:
        xy = PCA(n_components=2, random_state=seed).fit_transform(x) if n >= 2 and d >= 2 else np.zeros((n, 2))
        name = "PCA (scikit-learn)"
    return MapLayout(_unit_square(np.asarray(xy, dtype=np.float64)), name)


def _unit_square(xy: np.ndarray) -> np.ndarray:
    """Shifts and scales (one factor for both axes) into ``[0, 1]``, centred."""
    if len(xy) == 0:
        return xy.astype(np.float32)
    low, high = xy.min(axis=0), xy.max(axis=0)
    extent = float((high - low).max()) or 1.0
    return ((xy - (low + high) / 2) / extent + 0.5).astype(np.float32)


def nearest_neighbours(
    features: torch.Tensor, k: int = NEIGHBOURS, block: int | None = None, graph: NeighbourGraph | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows by cosine similarity, most similar first.

    The ranking :func:`twinview.evaluate.search.search` gives for the row's own embedding, with
    the row itself left out (exact up to :data:`~twinview.evaluate.neighbours.FAISS_MIN_ROWS`
    rows on a CPU; faiss beyond, where installed).

    Args:
        features: ``(N, D)`` embeddings.
        k: Neighbours per row.
        block: Rows per block of an exact search (memory ``block x N`` floats).
        graph: The features' neighbour graph with at least ``k`` neighbours, if already searched.

    Returns:
        ``(N, k')`` int64 rows and ``(N, k')`` float32 similarities, ``k' = min(k, N - 1)``.
    """
    k = min(k, len(features) - 1)
    idx, sims = (graph or neighbour_graph(features, k, block)).first(k)
    return idx.cpu().numpy().astype(np.int64), sims.float().cpu().numpy()


@dataclass(frozen=True)
class Sprites:
    """Thumbnails in square sheets of ``tiles x tiles``, row-major, image ``i`` in sheet ``i // tiles**2``.

    Attributes:
        urls: Each sheet as the page loads it (a ``data:`` URL or a path relative to the page).
        side: Pixels of one thumbnail.
        tiles: Thumbnails per sheet row.
        count: Thumbnails.
        nbytes: Bytes of the JPEG sheets.
    """

    urls: tuple[str, ...]
    side: int
    tiles: int
    count: int
    nbytes: int


class _Thumbnails:
    """DataLoader collate: ``(uint8 (3,S,S), label)`` items -> ``(m, t, t, 3)`` uint8 thumbnails
    (a class, not a closure, so that workers started by spawn can unpickle it)."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> np.ndarray:
        images = torch.stack([image for image, _ in items])  # (m, 3, S, S) uint8
        t = min(self.side, images.shape[-1])
        if t != images.shape[-1]:
            images = F.interpolate(images.float(), size=(t, t), mode="bilinear", antialias=True, align_corners=False)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().numpy()


def thumbnail_batches(dataset: Any, side: int = THUMB_SIDE, workers: int = 2, batch: int = 256) -> Iterator[np.ndarray]:
    """``(m, t, t, 3)`` uint8 thumbnails of a data set's ``(uint8 (3,S,S), label)`` items, in order,
    made in DataLoader workers; ``t = min(side, S)``."""
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_Thumbnails(side))


def write_sprites(
    batches: Iterable[np.ndarray], page: Path, tiles: int = SHEET_TILES, inline_bytes: int = INLINE_BYTES
) -> Sprites:
    """Writes thumbnails into JPEG sheets beside ``page`` (``PAGE_files/sheet-000.jpg``, ...), or
    returns them as ``data:`` URLs (and writes nothing) when all sheets together take at most
    ``inline_bytes``.

    Args:
        batches: ``(m, t, t, 3)`` uint8 thumbnails, in image order, all of one side ``t``.
        page: The page the sheets are for.
        tiles: Thumbnails per sheet row and column.
        inline_bytes: The most bytes inlined.
    """
    from io import BytesIO

    folder = page.with_name(page.stem + FILES_DIR_SUFFIX)
    if folder.exists():
        shutil.rmtree(folder)
    per_sheet = tiles * tiles
    sheets: list[Path] = []  # written as they fill, so memory holds one sheet
    pending: list[np.ndarray] = []
    side, count, nbytes = 0, 0, 0

    def flush(thumbs: np.ndarray) -> None:
        nonlocal nbytes
        filled = np.full((per_sheet, side, side, 3), 255, dtype=np.uint8)
        filled[: len(thumbs)] = thumbs
        # (tiles * tiles, s, s, 3) -> rows of tiles: (tiles, s, tiles, s, 3) -> one image
        sheet = (
            filled.reshape(tiles, tiles, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(tiles * side, tiles * side, 3)
        )
        buffer = BytesIO()
        Image.fromarray(sheet).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        folder.mkdir(parents=True, exist_ok=True)
        sheets.append(folder / f"sheet-{len(sheets):03d}.jpg")
        sheets[-1].write_bytes(buffer.getvalue())
        nbytes += buffer.tell()

    for batch in batches:
        if len(batch) == 0:
            continue
        side = side or batch.shape[1]
        pending.append(batch)
        count += len(batch)
        held = np.concatenate(pending) if len(pending) > 1 else pending[0]
        while len(held) >= per_sheet:
            flush(held[:per_sheet])
            held = held[per_sheet:]
        pending = [held] if len(held) else []
    if pending:
        flush(np.concatenate(pending))
    if nbytes <= inline_bytes:
        urls = ["data:image/jpeg;base64," + base64.b64encode(sheet.read_bytes()).decode("ascii") for sheet in sheets]
        if folder.exists():
            shutil.rmtree(folder)
    else:
        urls = [f"{folder.name}/{sheet.name}" for sheet in sheets]
    return Sprites(tuple(urls), side, tiles, count, nbytes)


@dataclass(frozen=True)
class ExplorerPoints:
    """What the explorer shows of each image.

    Attributes:
        names: Each image's path (or row id).
        layout: Where each is drawn.
        neighbours: ``(N, k)`` rows of each image's nearest other images, most similar first.
        similarities: ``(N, k)`` their cosine similarities.
        groups: ``(N,)`` each image's group (cluster or class), an index into ``group_names``.
        group_names: The groups' names, e.g. ``cluster 0 (120 images)``.
        group_kind: ``cluster`` or ``class``.
        flags: Flag name (``duplicates``, ``outliers``, ``leaks``) -> the rows that have it; a
            flag with no rows is listed with a count of 0.
        notes: Per row, one line shown on click (e.g. ``duplicate of a.jpg (hash)``), or empty.
    """

    names: Sequence[str]
    layout: MapLayout
    neighbours: np.ndarray
    similarities: np.ndarray
    groups: np.ndarray
    group_names: Sequence[str]
    group_kind: str = "cluster"
    flags: Mapping[str, Sequence[int]] = field(default_factory=dict)
    notes: Sequence[str] = ()


def _common_prefix(names: Sequence[str]) -> str:
    """The folder all names share (shown once at the top instead of in every name)."""
    if not names:
        return ""
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first.rfind("/", 0, i) + 1] if "/" in first[:i] else ""


def page_data(points: ExplorerPoints, sprites: Sprites) -> dict[str, Any]:
    """The page's JSON: everything the script reads, rounded to what a screen shows."""
    n = len(points.names)
    if not (len(points.layout.xy) == len(points.groups) == len(points.neighbours) == sprites.count == n):
        raise ValueError(
            f"{n} names, {len(points.layout.xy)} map points, {len(points.groups)} groups, "
            f"{len(points.neighbours)} neighbour rows and {sprites.count} thumbnails: they must be as many."
        )
    prefix = _common_prefix(points.names)
    return {
        "prefix": prefix,
        "names": [name[len(prefix) :] for name in points.names],
        "x": np.round(points.layout.xy[:, 0].astype(np.float64), 5).tolist(),
        "y": np.round(points.layout.xy[:, 1].astype(np.float64), 5).tolist(),
        "method": points.layout.method,
        "k": int(points.neighbours.shape[1]) if points.neighbours.ndim == 2 else 0,
        "neighbours": points.neighbours.astype(np.int64).ravel().tolist(),
        "similarities": np.round(points.similarities.astype(np.float64), 4).ravel().tolist(),
        "group": points.groups.astype(np.int64).tolist(),
        "groupNames": list(points.group_names),
        "groupKind": points.group_kind,
        "flags": {name: sorted(int(r) for r in rows) for name, rows in points.flags.items()},
        "notes": list(points.notes) if points.notes else [],
        "sprites": {"urls": list(sprites.urls), "side": sprites.side, "tiles": sprites.tiles},
    }


def write_explorer(points: ExplorerPoints, sprites: Sprites, path: Path, title: str) -> Path:
    """Writes the explorer page (the template ``explorer.html`` of this package, with the data)."""
    template = resources.files("twinview.evaluate").joinpath("explorer.html").read_text(encoding="utf-8")
    data = json.dumps(page_data(points, sprites), separators=(",", ":"), allow_nan=False)
    data = data.replace("<", "\\u003c")  # no name can end the data block or open a comment in it
    before, after = template.split("__DATA__")  # the template holds it once
    title = html.escape(title)
    page = before.replace("__TITLE__", title) + data + after.replace("__TITLE__", title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)
    return path


def explore(
    features: torch.Tensor,
    names: Sequence[str],
    thumbnails: Iterable[np.ndarray],
    groups: np.ndarray,
    group_names: Sequence[str],
    group_kind: str,
    path: Path,
    title: str,
    *,
    flags: Mapping[str, Sequence[int]],
    notes: Sequence[str] = (),
    map_method: str = "auto",
    seed: int = 0,
    graph: NeighbourGraph | None = None,
) -> tuple[Path, str]:
    """Everything of an explorer page from embeddings: the map (:func:`project`), the neighbours
    (:func:`nearest_neighbours`, from ``graph`` when already searched), the sprite sheets of
    ``thumbnails`` (:func:`write_sprites`, in row order) and the page (:func:`write_explorer`).

    Returns:
        The page, and the name of the map's method.
    """
    layout = project(features, map_method, seed=seed)
    neighbours, sims = nearest_neighbours(features, graph=graph)
    sprites = write_sprites(thumbnails, path)
    points = ExplorerPoints(names, layout, neighbours, sims, groups, group_names, group_kind, flags, notes)
    return write_explorer(points, sprites, path, title), layout.method
