"""Every image's nearest other images (the k-nearest-neighbour graph of the embeddings), exact or
with faiss, and the nearest images of one set in another.

Near-duplicates, relative duplicates, uniqueness, the explorer's neighbours and leaks all start from
this graph. The exact search compares every row with every other in blocks on the embeddings'
device: right up to ~10^5 rows on a CPU (50,000 rows of 512: 15 s on 2 cores), but its time grows with
N^2 (a million rows: hours). From :data:`FAISS_MIN_ROWS` rows on a CPU, where ``faiss`` is installed
(``pip install twinview[scale]``), the graph comes from a faiss inverted-file index (``IndexIVFFlat``,
inner product of the normalised embeddings: Jégou et al., "Product quantization for nearest
neighbor search", 2011, and Johnson et al., "Billion-scale similarity search with GPUs", 2017):
k-means cells, each row compared only with the rows of its :data:`NPROBE` nearest cells. Its
recall against the exact graph and its time at a million rows are in docs/BENCHMARKS.md
(``bench/scale.py``). On a GPU the exact search stays (faiss-gpu is not wired in; not measured here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 4096  # rows per block of an exact search against all rows, at most
BLOCK_FLOATS = 1 << 26  # similarities a block may hold (256 MB of float32), so a million rows fit too
FAISS_MIN_ROWS = 100_000  # from here on a CPU, faiss (where installed) instead of the exact search
NPROBE = 16  # cells of the inverted file visited per query
CELLS_PER_SQRT_ROW = 4  # cells: 4 x sqrt(N) (faiss's guideline is 4-16 x sqrt(N))
TRAIN_ROWS_PER_CELL = 40  # k-means of the cells on a sample of 40 rows per cell (faiss warns under 39)
KMEANS_ITERATIONS = 10
QUERY_BLOCK = 65536  # rows searched per faiss call (memory of the answers)


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def uses_faiss(n: int, device: torch.device | str = "cpu") -> bool:
    """Whether a graph of ``n`` rows on ``device`` is searched with faiss."""
    return n >= FAISS_MIN_ROWS and torch.device(device).type == "cpu" and faiss_available()


def engine_note(n: int, device: torch.device | str = "cpu") -> str:
    """What searches ``n`` rows, for the terminal: the engine and the threshold."""
    if uses_faiss(n, device):
        return f"faiss IVF ({n:,} rows >= {FAISS_MIN_ROWS:,}; {NPROBE} of {_cells(n):,} cells per query)"
    if n >= FAISS_MIN_ROWS and torch.device(device).type == "cpu":
        return (
            f"exact ({n:,} rows: faiss is not installed; pip install twinview[scale] searches from {FAISS_MIN_ROWS:,})"
        )
    return f"exact (under {FAISS_MIN_ROWS:,} rows, or on a GPU)"


@dataclass(frozen=True)
class NeighbourGraph:
    """Each row's nearest other rows.

    Attributes:
        indices: ``(N, k)`` long, most similar first, never the row itself.
        similarities: ``(N, k)`` float32 cosine similarities.
        engine: ``exact`` or ``faiss-ivf``.
    """

    indices: torch.Tensor
    similarities: torch.Tensor
    engine: str

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def first(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest of each row.

        Raises:
            ValueError: If the graph holds fewer.
        """
        if k > self.k:
            raise ValueError(f"the graph holds {self.k} neighbours per row, {k} were asked for.")
        return self.indices[:, :k], self.similarities[:, :k]


def neighbour_graph(features: torch.Tensor, k: int, chunk: int | None = None) -> NeighbourGraph:
    """Each row's ``min(k, N - 1)`` nearest other rows by cosine similarity.

    Args:
        features: ``(N, D)`` embeddings (normalised here).
        k: Neighbours per row.
        chunk: Rows per block of the exact search (memory ``chunk x N``); None: :data:`CHUNK`,
            fewer where a block would hold more than :data:`BLOCK_FLOATS` similarities.

    Returns:
        The graph, on the features' device.
    """
    x = F.normalize(features.float(), dim=1)
    n = len(x)
    k = max(0, min(k, n - 1))
    if uses_faiss(n, x.device) and k > 0:
        index = ivf_index(x.numpy())
        ids, similarities = _faiss_others(index, x.numpy(), k)
        return NeighbourGraph(torch.from_numpy(ids), torch.from_numpy(similarities), "faiss-ivf")
    idx, sims = exact_others_topk(x, torch.arange(n, device=x.device), k, chunk)
    return NeighbourGraph(idx, sims, "exact")


def exact_others_topk(
    x: torch.Tensor, rows: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar other rows of each of ``rows`` in ``x``, exactly, in blocks.

    Args:
        x: ``(N, D)`` L2-normalised features.
        rows: ``(R,)`` long indices into ``x``.
        k: Neighbours per row, ``<= N - 1``.
        chunk: Rows per block (memory ``chunk x N``); None: :data:`CHUNK`, fewer where ``N`` is so
            large that a block would hold more than :data:`BLOCK_FLOATS` similarities.

    Returns:
        ``(R, k)`` long indices and ``(R, k)`` similarities, most similar first.
    """
    chunk = chunk or max(1, min(CHUNK, BLOCK_FLOATS // max(1, len(x))))
    indices, sims = [], []
    for start in range(0, len(rows), chunk):
        block = rows[start : start + chunk]  # (m,)
        sim = x[block] @ x.T  # (m, N)
        sim[torch.arange(len(block), device=x.device), block] = float("-inf")  # never itself
        top = sim.topk(k, dim=1)  # (m, k)
        indices.append(top.indices)
        sims.append(top.values)
    if not indices:
        return torch.empty(0, k, dtype=torch.long, device=x.device), torch.empty(0, k, device=x.device)
    return torch.cat(indices), torch.cat(sims)


def cross_topk(
    queries: torch.Tensor, base: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``min(k, N)`` nearest rows of ``base`` by cosine similarity (faiss from
    :data:`FAISS_MIN_ROWS` base rows on a CPU, where installed; else exact, in blocks of ``chunk``
    queries).

    Returns:
        ``(M, k)`` long indices into ``base`` and ``(M, k)`` similarities, most similar first.
    """
    a = F.normalize(base.float(), dim=1)  # (N, D)
    b = F.normalize(queries.float(), dim=1).to(a.device)  # (M, D)
    k = min(k, len(a))
    if uses_faiss(len(a), a.device) and k > 0 and len(b):
        index = ivf_index(a.numpy())
        sims, idx = _search(index, b.numpy(), k)
        return torch.from_numpy(idx), torch.from_numpy(sims)
    chunk = chunk or max(1, min(CHUNK, BLOCK_FLOATS // max(1, len(a))))
    parts = [(b[start : start + chunk] @ a.T).topk(k, dim=1) for start in range(0, len(b), chunk)]
    if not parts:
        return torch.zeros(0, k, dtype=torch.long, device=a.device), torch.zeros(0, k, device=a.device)
    return torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])


# --- faiss ------------------------------------------------------------------------------------


def _cells(n: int) -> int:
    return max(1, min(round(CELLS_PER_SQRT_ROW * math.sqrt(n)), n // TRAIN_ROWS_PER_CELL))


def ivf_index(x: np.ndarray, seed: int = 0, nprobe: int = NPROBE) -> Any:
    """A faiss ``IndexIVFFlat`` (inner product) of the rows of ``x`` (L2-normalised float32),
    its cells from a seeded k-means of a sample of :data:`TRAIN_ROWS_PER_CELL` rows per cell."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    cells = _cells(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=min(n, cells * TRAIN_ROWS_PER_CELL), replace=False))]
    index.train(sample)
    index.add(x)
    index.nprobe = min(nprobe, cells)
    return index


def hnsw_index(x: np.ndarray, links: int = 32, ef_search: int = 64) -> Any:
    """A faiss ``IndexHNSWFlat`` (inner product; Malkov and Yashunin, 2018) of the rows of ``x``."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexHNSWFlat(x.shape[1], links, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    index.hnsw.efSearch = ef_search
    return index


def _search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, k)`` similarities and int64 ids (``k <= index.ntotal``), in blocks of
    :data:`QUERY_BLOCK` queries. A query whose visited cells hold fewer than ``k`` rows (faiss
    answers id -1 there) is searched again in every cell, so no id is ever -1."""
    sims, ids = [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        block = np.ascontiguousarray(queries[start : start + QUERY_BLOCK], dtype=np.float32)
        s, i = index.search(block, k)
        short = (i < 0).any(axis=1)
        if short.any() and hasattr(index, "nprobe"):  # an inverted file: visit every cell for these
            visited = index.nprobe
            index.nprobe = index.nlist
            s[short], i[short] = index.search(np.ascontiguousarray(block[short]), k)
            index.nprobe = visited
        sims.append(s.astype(np.float32))
        ids.append(i.astype(np.int64))
    return np.concatenate(sims), np.concatenate(ids)


def _faiss_others(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows from ``index`` (which holds ``x``): ``k + 1`` searched,
    the row itself dropped (wherever it ranks: an exact copy may come first)."""
    sims, ids = _search(index, x, k + 1)  # (N, k+1)
    own = ids == np.arange(len(x))[:, None]
    own[~own.any(axis=1), -1] = True  # itself not returned: drop the farthest instead
    keep = ~own
    return ids[keep].reshape(len(x), k), sims[keep].reshape(len(x), k)


# --- an index beside an embedding file (twinview embed --index, twinview search) ---------------

INDEX_KINDS = ("ivf", "hnsw")


def index_file(embeddings: Path) -> Path:
    """``FILE.faiss`` beside the embedding file ``FILE``."""
    return Path(f"{embeddings}.faiss")


def _index_meta_file(embeddings: Path) -> Path:
    return Path(f"{embeddings}.faiss.json")


STAMP_SAMPLES = 16  # blocks of the embedding file hashed to tell its versions apart
STAMP_BLOCK = 4096


def _file_stamp(path: Path) -> dict[str, Any]:
    """The file's size and a hash of :data:`STAMP_SAMPLES` blocks spread over it: another version
    of the file (other embeddings) differs, a copy elsewhere (another mtime) does not, and it
    costs a few reads, not a pass over gigabytes."""
    import hashlib

    size = Path(path).stat().st_size
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for i in range(STAMP_SAMPLES):
            f.seek(max(0, (size - STAMP_BLOCK) * i // max(1, STAMP_SAMPLES - 1)))
            digest.update(f.read(STAMP_BLOCK))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def write_index_file(embeddings: Path, kind: str, seed: int = 0) -> Path:
    """Builds a faiss index of every row of an embedding file and writes it beside the file
    (``FILE.faiss``, with ``FILE.faiss.json`` saying what it is and which file it indexes).

    Args:
        embeddings: A file written by ``twinview embed``.
        kind: ``ivf`` (:func:`ivf_index`: fast to build, exact within the visited cells) or
            ``hnsw`` (:func:`hnsw_index`: slower to build, fewer distance computations per query).
        seed: Seed of the IVF cells' k-means.

    Raises:
        ValueError: An unknown kind.
        ImportError: Without faiss.
    """
    import faiss

    from twinview.evaluate.embedding_file import iter_embedding_file, read_metadata

    if kind not in INDEX_KINDS:
        raise ValueError(f"--index must be one of {', '.join(INDEX_KINDS)}, got '{kind}'.")
    x = np.zeros((0, 0), dtype=np.float32)
    for block in iter_embedding_file(embeddings, columns=("embedding",)):  # one copy of the rows in memory
        if block.start == 0:
            x = np.empty((_row_count(embeddings), block.embeddings.shape[1]), dtype=np.float32)
        x[block.start : block.start + len(block.embeddings)] = F.normalize(block.embeddings, dim=1).numpy()
    index = ivf_index(x, seed) if kind == "ivf" else hnsw_index(x)
    path = index_file(embeddings)
    temporary = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(temporary))
    temporary.replace(path)
    meta = {
        "kind": kind,
        "rows": int(x.shape[0]),
        "dims": int(x.shape[1]) if x.ndim == 2 else 0,
        "weights": read_metadata(embeddings).get("weights"),
        "embedding_file": _file_stamp(embeddings),
        "nprobe": int(getattr(index, "nprobe", 0)),
        "ef_search": int(index.hnsw.efSearch) if kind == "hnsw" else 0,
    }
    _index_meta_file(embeddings).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _row_count(embeddings: Path) -> int:
    """Rows of an embedding file, from its footer (Parquet) or header (``.npy``)."""
    if Path(embeddings).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(embeddings).metadata.num_rows)
    return int(np.load(embeddings, mmap_mode="r").shape[0])


def open_index_file(embeddings: Path) -> tuple[Any, dict[str, Any]] | None:
    """The faiss index beside an embedding file and what it is, or None where there is none (or
    faiss is not installed).

    Raises:
        ValueError: The index was made from another version of the file.
    """
    path, meta_path = index_file(embeddings), _index_meta_file(embeddings)
    if not (path.is_file() and meta_path.is_file() and faiss_available()):
        return None
    import faiss

    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("embedding_file") != _file_stamp(embeddings):
        raise ValueError(
            f"'{path}' indexes an earlier version of '{embeddings}': build it again "
            "(twinview embed ... --index ivf), or delete it to search exactly."
        )
    index: Any = faiss.read_index(str(path))  # an IndexIVFFlat or IndexHNSWFlat
    if meta["kind"] == "ivf":
        index.nprobe = meta["nprobe"]
    else:
        index.hnsw.efSearch = meta["ef_search"]
    return index, meta


def index_search(index: Any, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, k)`` cosine similarities and rows of the queries' nearest rows in a faiss index of
    normalised embeddings."""
    q = F.normalize(queries.float(), dim=1).cpu().numpy()
    sims, ids = _search(index, q, min(k, int(index.ntotal)))
    return torch.from_numpy(sims), torch.from_numpy(ids)
