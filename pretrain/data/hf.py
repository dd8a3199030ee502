"""Hugging Face ``datasets`` as an image source: saved data sets, parquet/arrow files, the hub.

``data.path`` forms (``data.split``, ``data.image_column``, ``data.label_column``, ``data.streaming``):

* ``hf:owner/name``: a hub data set (``datasets.load_dataset``; downloads unless cached);
* ``hf:imagefolder:/dir``: the ``imagefolder`` builder on a local folder;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* ``.parquet`` / ``.arrow`` files (a file or a glob);
* WebDataset ``.tar`` shards (``train-{000000..000999}.tar`` or a glob): the ``webdataset``
  builder; training streams them (:mod:`twinview.pretrain.data.shards`), evaluation reads them
  through an Arrow copy that ``datasets`` caches.

The image column is the one feature of type ``datasets.Image`` (set ``data.image_column`` when
there are several); the label column is the one ``ClassLabel`` feature, else an integer column
named ``label`` or ``cls`` (WebDataset's class field), if any. ``data.streaming``
reads the source as an iterable (:func:`streamed`), for data sets larger than the disk: each
process and DataLoader worker takes its own shard, and ``train.max_steps_per_epoch`` sets the
epoch length. Images are decoded here, not by ``datasets``, so that a bad one is skipped and
listed instead of stopping the run.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from twinview.pretrain.data.decode import BadImage, square_rgb
from twinview.pretrain.data.folder import SkipLog, first_decodable
from twinview.pretrain.data.index import HF_PREFIX, SHARDS, UNLABELED, FolderIndex

if TYPE_CHECKING:
    from twinview.pretrain.data.source import Source

SHUFFLE_BUFFER = 1000  # rows mixed across the shards being read
LABEL_NAMES = ("label", "cls")  # integer columns taken as labels when there is no ClassLabel


def open_table(
    path: str,
    kind: str,
    shards: tuple[str, ...],
    split: str,
    streaming: bool,
    image_column: str = "",
    label_column: str = "",
) -> tuple[datasets.Dataset | datasets.IterableDataset, str, str | None]:
    """Opens a Hugging Face source or tar shards as a ``datasets`` data set of one split.

    Args:
        path: The path (``hf:...``, a saved data set, parquet/arrow files).
        kind: Its kind (:data:`~twinview.pretrain.data.source.HF` or ``SHARDS``).
        shards: The shard files, for tar shards.
        split: The split of a Hugging Face source.
        streaming: Open it as an iterable data set (only the rows read are downloaded).
        image_column: The image column (empty: the one ``Image`` feature).
        label_column: The label column (empty: see :func:`pick_columns`).

    Returns:
        The data set with its image column undecoded (``Image(decode=False)``: images are decoded
        here, so that a bad one is skipped, not fatal), its image column and its label column.
    """
    table = _load(path, kind, shards, split, streaming)
    image, label = pick_columns(table.features, image_column, label_column)
    return table.cast_column(image, datasets.Image(decode=False)), image, label


def _load(
    path: str, kind: str, shards: tuple[str, ...], split: str, streaming: bool
) -> datasets.Dataset | datasets.IterableDataset:
    if kind == SHARDS:
        return datasets.load_dataset("webdataset", data_files=list(shards), split="train", streaming=streaming)
    if path.startswith(HF_PREFIX + "imagefolder:"):
        return datasets.load_dataset(
            "imagefolder", data_dir=path[len(HF_PREFIX + "imagefolder:") :], split=split, streaming=streaming
        )
    if path.startswith(HF_PREFIX):
        return datasets.load_dataset(path[len(HF_PREFIX) :], split=split, streaming=streaming)
    p = Path(path).expanduser()
    if p.is_dir():
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"'{path}' has splits {', '.join(loaded)}; no data.split={split}.")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    files = sorted(glob.glob(str(p)))
    if not files:
        raise FileNotFoundError(f"no files match '{path}'.")
    kind = "parquet" if files[0].lower().endswith(".parquet") else "arrow"
    return datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)


def pick_columns(features: datasets.Features, image_column: str, label_column: str) -> tuple[str, str | None]:
    """The image column (explicit, or the one Image feature) and the label column (or None)."""
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if image_column:
        if image_column not in features:
            raise ValueError(f"data.image_column={image_column!r} is not a column. Columns: {', '.join(features)}.")
        image = image_column
    elif len(images) == 1:
        image = images[0]
    else:
        found = ", ".join(images) if images else "none"
        raise ValueError(f"cannot tell the image column (Image features: {found}); set data.image_column.")
    if label_column:
        if label_column not in features:
            raise ValueError(f"data.label_column={label_column!r} is not a column. Columns: {', '.join(features)}.")
        return image, label_column
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(labels) == 1:
        return image, labels[0]
    named = [
        k
        for k in LABEL_NAMES
        if isinstance(features.get(k), datasets.Value) and features[k].dtype.startswith(("int", "uint"))
    ]
    return image, named[0] if not labels and named else None


def to_square_rgb(image: Any, size: int) -> torch.Tensor:
    """A decoded ``datasets`` image (PIL, or a path/bytes dict) -> ``(3, size, size)`` uint8."""
    try:
        if not isinstance(image, Image.Image):  # an undecoded {"path", "bytes"} cell; the path may be a name only
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        return torch.from_numpy(square_rgb(image, size)).permute(2, 0, 1)
    except Exception as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None


class HFImageDataset(Dataset):
    """A Hugging Face source (or tar shards, through an Arrow copy that ``datasets`` caches) as
    ``(uint8 (3,S,S), label)`` items; bad rows are replaced by the next good one, or raise with
    ``strict``."""

    def __init__(self, source: Source, image_size: int, strict: bool = False, skip_log: SkipLog | None = None) -> None:
        """Args:
        source: A resolved Hugging Face source or tar shards.
        image_size: Side of the returned square images.
        strict: Raise :class:`BadImage` on a row that cannot be decoded.
        skip_log: Where skipped rows are recorded.
        """
        self.image_column, self.label_column = source.image_column, source.label_column or None
        if isinstance(source.table, datasets.Dataset):
            self.data = source.table
        else:  # streamed for the survey (shards, data.streaming): read map-style here
            self.data, _, _ = open_table(
                source.path, source.kind, source.shards, source.split, False, source.image_column, source.label_column
            )
        self.image_size = image_size
        if self.label_column:
            labels = tuple(UNLABELED if v is None else int(v) for v in self.data[self.label_column])
            feature = self.data.features[self.label_column]
            classes = (
                tuple(feature.names)
                if isinstance(feature, datasets.ClassLabel)
                else tuple(str(v) for v in sorted(set(labels) - {UNLABELED}))
            )
        else:
            labels, classes = (UNLABELED,) * len(self.data), ()
        if "__url__" in self.data.column_names and "__key__" in self.data.column_names:  # WebDataset shards
            names = [f"{u}#{k}" for u, k in zip(self.data["__url__"], self.data["__key__"], strict=True)]
        else:
            names = [f"{source.path}#{i}" for i in range(len(self.data))]
        self.index = FolderIndex(root=Path(source.path), files=tuple(map(Path, names)), labels=labels, classes=classes)
        self.strict, self.skip_log = strict, skip_log
        self.bad: dict[int, str] = {}

    def fingerprint(self) -> str:
        """Changes whenever the rows or the image size would (``datasets``' own fingerprint)."""
        return f"{self.data._fingerprint}-{self.image_size}"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return first_decodable(
            i, len(self), self._load, lambda j: self.index.files[j], self.bad, self.strict, self.skip_log
        )

    def _load(self, j: int) -> tuple[torch.Tensor, int]:
        try:
            cell = self.data[j][self.image_column]  # {"path", "bytes"}: decoded by to_square_rgb
        except Exception as err:
            raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None
        return to_square_rgb(cell, self.image_size), self.index.labels[j]


def streamed(
    source: Source, image_size: int, rank: int = 0, world: int = 1, seed: int = 0, skip_log: SkipLog | None = None
) -> DecodedStream:
    """A streamed Hugging Face source; each process reads its own share (``split_dataset_by_node``)."""
    rows = source.table
    if world > 1:
        rows = split_dataset_by_node(rows, rank=rank, world_size=world)
    return DecodedStream(
        rows, source.image_column, source.label_column or None, image_size, seed, skip_log, source.path
    )


class DecodedStream(IterableDataset):
    """Rows of a streamed ``datasets`` source as an endless stream of ``(uint8 (3,S,S), label)``.

    ``datasets`` deals the source's shards to the DataLoader workers and shuffles (shard order and a
    buffer of :data:`SHUFFLE_BUFFER` rows, reseeded every epoch). A row whose image cannot be decoded
    is skipped and listed in the skip log (as ``url#key`` for WebDataset samples).
    """

    def __init__(
        self,
        rows: datasets.IterableDataset,
        image_column: str,
        label_column: str | None,
        image_size: int,
        seed: int,
        skip_log: SkipLog | None,
        source: str,
    ) -> None:
        """Args:
        rows: This process's rows, with the image column undecoded (``Image(decode=False)``).
        image_column: The image column.
        label_column: The label column, or None.
        image_size: Side of the returned square images.
        seed: Shuffling seed (plus the epoch).
        skip_log: Where skipped rows are listed.
        source: ``data.path``, to name rows that have no WebDataset key.
        """
        self.rows, self.image_column, self.label_column = rows, image_column, label_column
        self.image_size, self.seed, self.epoch, self.skip_log, self.source = image_size, seed, 0, skip_log, source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        while True:  # the training loop cuts epochs with train.max_steps_per_epoch
            produced = 0
            for row in self.rows.shuffle(seed=self.seed + self.epoch, buffer_size=SHUFFLE_BUFFER):
                try:
                    image = to_square_rgb(row[self.image_column], self.image_size)
                except BadImage as err:
                    if self.skip_log is not None:
                        name = f"{row['__url__']}#{row['__key__']}" if "__key__" in row else f"{self.source}#(streamed)"
                        self.skip_log.record(Path(name), str(err))
                    continue
                produced += 1
                label = row[self.label_column] if self.label_column else None
                yield image, UNLABELED if label is None else int(label)
            self.epoch += 1
            if not produced:  # e.g. a DataLoader worker that got no shard: end, do not spin
                return
