"""Hugging Face ``datasets`` as an image source: saved data sets, parquet/arrow files, the hub.

``data.path`` forms (``data.split``, ``data.image_column``, ``data.label_column``, ``data.streaming``):

* ``hf:owner/name``: a hub data set (``datasets.load_dataset``; downloads unless cached);
* ``hf:imagefolder:/dir``: the ``imagefolder`` builder on a local folder;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* ``.parquet`` / ``.arrow`` files (a file or a glob).

The image column is the one feature of type ``datasets.Image`` (set ``data.image_column`` when
there are several); the label column is the one ``ClassLabel`` feature, if any. ``data.streaming``
reads the source as an iterable, for data sets larger than the disk: each process and DataLoader
worker takes its own shard, and ``train.max_steps_per_epoch`` sets the epoch length.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from twinview.pretrain.data.decode import BadImage, square_rgb
from twinview.pretrain.data.source_kind import HF_PREFIX
from twinview.pretrain.data.sources import UNLABELED, FolderIndex, SkipLog, first_decodable


def load_source(path: str, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Opens the source as a ``datasets`` data set of one split."""
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
    return image, labels[0] if len(labels) == 1 else None


def to_square_rgb(image: Any, size: int) -> torch.Tensor:
    """A decoded ``datasets`` image (PIL, or a path/bytes dict) -> ``(3, size, size)`` uint8."""
    try:
        if not isinstance(image, Image.Image):  # an undecoded {"path", "bytes"} cell
            image = Image.open(image["path"] if image.get("path") else io.BytesIO(image["bytes"]))
        return torch.from_numpy(square_rgb(image, size)).permute(2, 0, 1)
    except Exception as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None


class HFImageDataset(Dataset):
    """A map-style ``datasets`` source as ``(uint8 (3,S,S), label)`` items; bad rows are replaced."""

    def __init__(
        self,
        path: str,
        image_size: int,
        split: str = "train",
        image_column: str = "",
        label_column: str = "",
        strict: bool = False,
        skip_log: SkipLog | None = None,
    ) -> None:
        self.data = load_source(path, split, streaming=False)
        self.image_column, self.label_column = pick_columns(self.data.features, image_column, label_column)
        self.image_size = image_size
        if self.label_column:
            labels = tuple(int(v) for v in self.data[self.label_column])
            feature = self.data.features[self.label_column]
            classes = (
                tuple(feature.names)
                if isinstance(feature, datasets.ClassLabel)
                else tuple(sorted(set(map(str, labels))))
            )
        else:
            labels, classes = (UNLABELED,) * len(self.data), ()
        self.index = FolderIndex(
            root=Path(path),
            files=tuple(Path(f"{path}#{i}") for i in range(len(self.data))),
            labels=labels,
            classes=classes,
        )
        self.strict, self.skip_log = strict, skip_log
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return first_decodable(
            i, len(self), self._load, lambda j: self.index.files[j], self.bad, self.strict, self.skip_log
        )

    def _load(self, j: int) -> tuple[torch.Tensor, int]:
        try:
            cell = self.data[j][self.image_column]  # datasets decodes the Image feature here
        except Exception as err:
            raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None
        return to_square_rgb(cell, self.image_size), self.index.labels[j]


class HFStreamingDataset(IterableDataset):
    """A streamed ``datasets`` source; each process and worker reads its own shard, endlessly."""

    def __init__(
        self,
        path: str,
        image_size: int,
        split: str = "train",
        image_column: str = "",
        label_column: str = "",
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        self.path, self.split, self.image_size = path, split, image_size
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.data = load_source(path, split, streaming=True)
        self.image_column, self.label_column = pick_columns(self.data.features, image_column, label_column)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        # one share per process; datasets itself splits a share among the DataLoader workers
        data = split_dataset_by_node(self.data, rank=self.rank, world_size=self.world) if self.world > 1 else self.data
        while True:  # the training loop cuts epochs with train.max_steps_per_epoch
            produced = 0
            for row in data.shuffle(seed=self.seed + self.epoch, buffer_size=1000):
                try:
                    image = to_square_rgb(row[self.image_column], self.image_size)
                except BadImage:
                    continue
                produced += 1
                yield image, int(row[self.label_column]) if self.label_column else UNLABELED
            self.epoch += 1
            if not produced:  # e.g. a DataLoader worker that got no shard: end, do not spin
                return
