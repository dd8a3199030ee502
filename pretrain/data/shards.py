"""WebDataset tar shards as a training stream, for data sets larger than one disk.

``data.path=/data/train-{000000..000999}.tar`` (or a glob, or one ``.tar``) names shards in the
WebDataset layout: the files of one sample share a key (``000123.jpg``, ``000123.cls``). Each
shard is read by the ``datasets`` webdataset builder in streaming mode; the image is the one image
field (``data.image_column`` picks one of several), the label the ``.cls`` field if present.

* Each process reads only its own share of the shards (``files[rank::world]``, also when the
  count does not divide); ``datasets`` deals a process's shards to its DataLoader workers,
  shuffles their order every epoch and mixes samples in a buffer (:class:`DecodedStream`).
* A sample whose image cannot be decoded is skipped and listed as ``shard.tar#key`` with its reason
  in ``skipped_files.txt``; so is a shard that cannot be read (a truncated tar keeps the samples
  before the damage), and the stream goes on with the next shard.
* The stream has no end: the training loop cuts epochs of ``train.max_steps_per_epoch`` steps.

Shards are read one at a time, each by its own webdataset builder (instead of one builder over
all files), so that an unreadable shard ends only itself and not the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from twinview.pretrain.data.folder import SkipLog
from twinview.pretrain.data.hf import DecodedStream, pick_columns

if TYPE_CHECKING:
    from twinview.pretrain.data.source import Source


def read_shards(shards: list[str], features: datasets.Features, skip_log: str) -> Iterator[dict[str, Any]]:
    """The samples of some shards in turn; a shard that fails is listed and left (a generator for
    ``datasets.IterableDataset.from_generator``, which deals ``shards`` to the DataLoader workers)."""
    for shard in shards:
        read = 0
        try:
            one = datasets.load_dataset(
                "webdataset", data_files=[shard], split="train", streaming=True, features=features
            )
            # .iter(), not a for loop: inside a DataLoader worker, IterableDataset.__iter__ would deal
            # this one-shard data set among the workers again, and all but one would get nothing
            for batch in one.iter(batch_size=1):  # one: a batch would lose its samples before a damage
                read += 1
                yield {name: column[0] for name, column in batch.items()}
        except Exception as err:  # a truncated or corrupt tar, a field the first samples did not have
            if skip_log:
                SkipLog(Path(skip_log)).record(
                    Path(shard), f"shard unreadable after {read} samples: {type(err).__name__}: {err}"
                )


def infer_features(files: list[str]) -> datasets.Features:
    """The fields of the samples, as the builder infers them from the first samples of a shard (the
    first shard that can be read)."""
    errors = []
    for shard in files:
        try:
            return datasets.load_dataset("webdataset", data_files=[shard], split="train", streaming=True).features
        except Exception as err:  # a damaged shard: read_shards lists it when its turn comes
            errors.append(f"{shard}: {type(err).__name__}: {err}")
            if len(errors) == 3:
                break
    raise ValueError("cannot read the first samples of the shards:\n  " + "\n  ".join(errors))


def shard_rows(
    files: list[str], image_column: str = "", label_column: str = "", skip_log: SkipLog | None = None
) -> tuple[datasets.IterableDataset, str, str | None]:
    """The samples of some shards as an iterable ``datasets`` data set, the image undecoded.

    Args:
        files: The shards, read in turn (a damaged one is listed and left, see :func:`read_shards`).
        image_column: The image field (e.g. ``jpg``); empty: the one image field.
        label_column: The label field; empty: ``cls`` when the samples have one.
        skip_log: Where unreadable shards are listed.

    Returns:
        The rows, the image field and the label field (or None).
    """
    inferred = infer_features(files)
    image, label = pick_columns(inferred, image_column, label_column)
    features = inferred.copy()
    features[image] = datasets.Image(decode=False)  # decoded by DecodedStream, which skips bad ones
    rows = datasets.IterableDataset.from_generator(
        read_shards,
        features=features,
        gen_kwargs={
            "shards": files,  # a list: datasets deals it to the DataLoader workers
            "features": features,
            "skip_log": str(skip_log.directory) if skip_log else "",
        },
    )
    return rows, image, label


def shard_stream(
    source: Source, image_size: int, rank: int = 0, world: int = 1, seed: int = 0, skip_log: SkipLog | None = None
) -> DecodedStream:
    """This process's share of the shards as an endless stream of ``(uint8 (3,S,S), label)``.

    Args:
        source: The resolved shards (their files, image and label fields).
        image_size: Side of the returned square images.
        rank: This process's index.
        world: Number of processes.
        seed: Shuffling seed (plus the epoch).
        skip_log: Where skipped samples and shards are listed.
    """
    mine = list(source.shards[rank::world])  # at least one per process: checked by twinview.pretrain.validate
    rows, image, label = shard_rows(mine, source.image_column, source.label_column, skip_log)
    return DecodedStream(rows, image, label, image_size, seed, skip_log, source.path)
