"""The embedding file that ``twinview embed`` writes and ``twinview search`` reads.

Two formats, chosen by the file's suffix:

- ``.parquet`` (the default): one row per image with columns ``path`` (file path, or ``source#row``
  for Hugging Face rows and ``shard#key`` for tar shards), ``embedding`` (a fixed-size list of
  float16 or float32) and ``label`` (the class name, only when the source has labels). Pandas,
  DuckDB, Polars and ``datasets.load_dataset("parquet", data_files=...)`` read it as it is. The
  model, image size and weights that made it are in the schema metadata under ``twinview``.
- ``.npy``: a plain ``(N, D)`` array, with ``NAME.rows.csv`` (``row,path,label``) and
  ``NAME.meta.json`` beside it, for people who only want an array.

Both are written from part files (one per chunk of rows, see :mod:`twinview.evaluate.embed`) a
part at a time, and read back a batch of rows at a time, so neither side ever holds all rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMATS = {".parquet": "parquet", ".npy": "npy"}
METADATA_KEY = b"twinview"
Part = tuple[list[str], np.ndarray, "list[str] | None"]  # names, (n, D) embeddings, labels (None: unlabelled)


@dataclass(frozen=True)
class EmbeddingRows:
    """A batch of rows of an embedding file.

    Attributes:
        start: Row number of the first row.
        names: Path (or row id) per row.
        embeddings: ``(n, D)`` float32 embeddings.
        labels: Class name per row, or None when the file has no labels.
    """

    start: int
    names: list[str]
    embeddings: torch.Tensor
    labels: list[str] | None


def file_format(path: Path) -> str:
    """``parquet`` or ``npy`` from the file's suffix.

    Raises:
        ValueError: For any other suffix.
    """
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"embedding file '{path}': the name must end in {' or '.join(FORMATS)}.")
    return fmt


def rows_file(path: Path) -> Path:
    """``NAME.rows.csv`` beside ``NAME.npy``."""
    return Path(path).with_suffix(".rows.csv")


def meta_file(path: Path) -> Path:
    """``NAME.meta.json`` beside ``NAME.npy``."""
    return Path(path).with_suffix(".meta.json")


def write_embedding_file(
    path: Path,
    parts: Iterator[Part],
    dims: int,
    dtype: str,
    metadata: dict[str, Any],
    num_rows: int,
) -> Path:
    """Writes the rows of ``parts`` in order, one part in memory at a time, atomically.

    Args:
        path: The ``.parquet`` or ``.npy`` file.
        parts: ``(names, (n, dims) array, labels or None)`` per part, in row order.
        dims: Embedding width.
        dtype: ``float16`` or ``float32``.
        metadata: What made the file (model, image size, ...), stored with it.
        num_rows: Total rows of all parts (the ``.npy`` array is allocated up front).

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if file_format(path) == "parquet":
        _write_parquet(tmp, parts, dims, dtype, metadata)
    else:
        _write_npy(tmp, path, parts, dims, dtype, metadata, num_rows)
    tmp.replace(path)
    return path


def _write_parquet(
    tmp: Path,
    parts: Iterator[Part],
    dims: int,
    dtype: str,
    metadata: dict[str, Any],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = pa.float16() if dtype == "float16" else pa.float32()
    writer: pq.ParquetWriter | None = None
    try:
        for names, array, labels in parts:
            columns: dict[str, pa.Array] = {
                "path": pa.array(names, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(array.astype(dtype).ravel(), value), dims),
            }
            if labels is not None:
                columns["label"] = pa.array(labels, pa.string())
            table = pa.table(columns)
            if writer is None:
                schema = table.schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(writer.schema))  # one row group per part
        if writer is None:  # no rows: still a valid, empty file
            schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(value, dims))])
            writer = pq.ParquetWriter(tmp, schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()}))
    finally:
        if writer is not None:
            writer.close()


def _write_npy(
    tmp: Path,
    path: Path,
    parts: Iterator[Part],
    dims: int,
    dtype: str,
    metadata: dict[str, Any],
    num_rows: int,
) -> None:
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num_rows, dims))
    row = 0
    with rows_file(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row", "path", "label"])
        for names, embeddings, labels in parts:
            array[row : row + len(names)] = embeddings
            out.writerows((row + i, n, "" if labels is None else labels[i]) for i, n in enumerate(names))
            row += len(names)
    array.flush()
    del array
    meta_file(path).write_text(json.dumps(metadata, indent=2) + "\n")


def read_metadata(path: Path) -> dict[str, Any]:
    """What made the file (see :func:`write_embedding_file`); empty when it was not written by twinview."""
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else {}
    meta = meta_file(path)
    return json.loads(meta.read_text()) if meta.is_file() else {}


def iter_embedding_file(path: Path, batch_rows: int = 65536, columns: Sequence[str] = ()) -> Iterator[EmbeddingRows]:
    """The file's rows in order, ``batch_rows`` at a time.

    Args:
        path: A file written by :func:`write_embedding_file` (or any Parquet file with ``path`` and
            ``embedding`` columns).
        batch_rows: Rows per batch.
        columns: Read only these of ``path``, ``embedding`` (empty: both); a skipped column comes
            back empty (no names, or a ``(n, 0)`` tensor).

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file '{path}' does not exist (write one with twinview embed).")
    wanted = set(columns or ("path", "embedding"))
    if file_format(path) == "parquet":
        yield from _iter_parquet(path, batch_rows, wanted)
    else:
        yield from _iter_npy(path, batch_rows, wanted)


def _iter_parquet(path: Path, batch_rows: int, wanted: set[str]) -> Iterator[EmbeddingRows]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    has_labels = "label" in file.schema_arrow.names
    read = [c for c in ("path", "embedding") if c in wanted] + (["label"] if has_labels and "path" in wanted else [])
    start = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=read):
        n = batch.num_rows
        names = batch.column("path").to_pylist() if "path" in wanted else []
        if "embedding" in wanted:
            flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            embeddings = torch.from_numpy(flat.astype(np.float32).reshape(n, -1))
        else:
            embeddings = torch.empty(n, 0)
        labels = batch.column("label").to_pylist() if has_labels and "path" in wanted else None
        yield EmbeddingRows(start, names, embeddings, labels)
        start += n


def _iter_npy(path: Path, batch_rows: int, wanted: set[str]) -> Iterator[EmbeddingRows]:
    array = np.load(path, mmap_mode="r")
    with rows_file(path).open(newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for start in range(0, len(array), batch_rows):
            n = min(batch_rows, len(array) - start)
            block = [next(rows) for _ in range(n)] if "path" in wanted else []
            names = [r[1] for r in block]
            labels = [r[2] for r in block] if any(r[2] for r in block) else None
            embeddings = (
                torch.from_numpy(np.array(array[start : start + n], dtype=np.float32))
                if "embedding" in wanted
                else torch.empty(n, 0)
            )
            yield EmbeddingRows(start, names, embeddings, labels)


def read_embedding_file(path: Path) -> EmbeddingRows:
    """All rows at once (for files that fit in memory, e.g. tests and small folders)."""
    batches = list(iter_embedding_file(path))
    if not batches:
        return EmbeddingRows(0, [], torch.empty(0, 0), None)
    labels = [v for b in batches for v in (b.labels or [])] if batches[0].labels is not None else None
    return EmbeddingRows(0, [n for b in batches for n in b.names], torch.cat([b.embeddings for b in batches]), labels)
