"""WebDataset tar shards as a training stream, for data sets larger than one disk.

``data.path=/data/train-{000000..000999}.tar`` (or a glob, or one ``.tar``) names shards in the
WebDataset layout: the files of one sample share a key (``000123.jpg``, ``000123.cls``); the image
is the one image field (``data.image_column`` picks one of several), the label the ``.cls`` field
if present.

Training reads them with a small tar reader of our own (:func:`tar_files`, why: there) and the
``webdataset`` package's key grouping (:class:`ShardStream`): ``datasets``' streaming builder, used
before, cost ~240 us per sample in per-example feature encoding and thread hand-offs, which halved
the images per second of 32 px shards against a folder (docs/BENCHMARKS.md); ``datasets`` still
infers the fields and serves the evaluation's map-style reading (:func:`shard_rows`).

* Each process reads only its own share of the shards (``files[rank::world]``, also when the
  count does not divide), and each DataLoader worker a share of that (``[worker::workers]``); the
  shard order and a buffer of :data:`SHUFFLE_BUFFER` samples are shuffled by a generator seeded
  with the run's seed, the epoch and the worker, so a run is the same every time.
* A sample whose image cannot be decoded is skipped and listed as ``shard.tar#key`` with its reason
  in ``skipped_files.txt``; so is a shard that cannot be read (a truncated tar keeps the samples
  before the damage), and the stream goes on with the next shard.
* The stream has no end: the training loop cuts epochs of ``train.max_steps_per_epoch`` steps.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys

from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.data.folder import SkipLog
from twinview.pretrain.data.hf import SHUFFLE_BUFFER, pick_columns, to_square_rgb
from twinview.pretrain.data.index import UNLABELED

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
) -> ShardStream:
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
    return ShardStream(mine, source.image_column, source.label_column or None, image_size, f"{seed}/{rank}", skip_log)


class ShardStream(IterableDataset):
    """Some shards as an endless, seeded stream of decoded ``(uint8 (3,S,S), label)`` samples.

    Each DataLoader worker reads ``shards[worker::workers]`` (a worker without a shard ends at
    once); each pass over them takes a new shard order and buffer order, from a generator seeded
    by ``(seed, epoch, worker)`` (``shard_stream`` makes the seed ``"SEED/RANK"``).
    """

    def __init__(
        self,
        shards: list[str],
        image_field: str,
        label_field: str | None,
        image_size: int,
        seed: str,
        skip_log: SkipLog | None,
        buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        """Args:
        shards: The shard files this process reads.
        image_field: The image's file extension in a sample (``jpg``, ``png``, ...).
        label_field: The label's (``cls``), or None.
        image_size: Side of the returned square images.
        seed: Shuffling seed (the epoch and the worker are added to it).
        skip_log: Where skipped samples and shards are listed.
        buffer: Samples mixed across the shards being read.
        """
        self.shards, self.image_field, self.label_field = shards, image_field, label_field
        self.image_size, self.seed, self.skip_log, self.buffer = image_size, seed, skip_log, buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[worker::workers]
        epoch = self.epoch
        while mine:  # the training loop cuts epochs with train.max_steps_per_epoch
            rng = random.Random(f"{self.seed}/{epoch}/{worker}")  # a str seed: the same in every process
            samples = self._samples(rng.sample(mine, len(mine)))
            for sample in shuffle(self.buffer, initial=self.buffer, rng=rng)(samples):
                try:
                    image = to_square_rgb({"bytes": sample[self.image_field]}, self.image_size)
                except (BadImage, KeyError) as err:
                    if self.skip_log is not None:
                        self.skip_log.record(Path(f"{sample['__url__']}#{sample['__key__']}"), str(err))
                    continue
                label = sample.get(self.label_field) if self.label_field else None
                yield image, UNLABELED if label is None else int(label)
            epoch += 1

    def _samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        """The samples of the shards in turn, each a dict of raw fields plus ``__key__`` and
        ``__url__``; a shard that fails keeps the samples before the damage and is listed."""
        for shard in shards:
            failed: list[Exception] = []
            read = 0
            try:
                with open(shard, "rb") as f:
                    for sample in group_by_keys(_members(f, shard, failed)):
                        read += 1
                        yield sample
            except OSError as err:  # cannot be opened
                failed.append(err)
            if failed and self.skip_log is not None:
                first = failed[0]
                reason = f"shard unreadable after {read} samples: {type(first).__name__}: {first}"
                self.skip_log.record(Path(shard), reason)


def _members(f: Any, url: str, failed: list[Exception]) -> Iterator[dict[str, Any]]:
    """A tar's files as ``webdataset`` members (``fname``, ``data``, ``__url__``), ending (not
    raising) where the tar is damaged, so that the key grouping still hands over the last whole
    sample; the error goes to ``failed``."""
    files = tar_files(f)
    while True:
        try:
            member = next(files)
        except StopIteration:
            return
        except Exception as err:  # a truncated or corrupt tar
            failed.append(err)
            return
        member["__url__"] = url
        yield member


class TarDamaged(ValueError):
    """A tar that ends inside a header or a file's data, or whose header is not a tar header."""


def tar_files(f: Any) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream in order, as ``{"fname", "data"}``.

    Our own reader, because the standard ``tarfile`` module (which ``webdataset``'s iterator uses)
    spends ~35 us per member parsing headers in Python: at 32 px, two members per sample made shards
    0.88x a JPEG folder's images/s (docs/BENCHMARKS.md). This one reads the POSIX (ustar), GNU and
    pax forms that ``tarfile``, GNU tar and ``webdataset``'s writer produce: names (with the ustar
    prefix, GNU long names and pax ``path``), sizes in octal or base-256, and skips everything that
    is not a regular file. Metadata files (``__*__``) are skipped, as ``webdataset`` does.

    Raises:
        TarDamaged: Where the stream ends inside a header or a file, or a header's checksum is wrong.
    """
    long_name = ""
    while True:
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:  # the end of the archive
            return
        if len(header) < 512:
            raise TarDamaged(f"the tar ends inside a header ({len(header)} of 512 bytes)")
        if _checksum(header) != _number(header[148:156]):
            raise TarDamaged("a tar header has a wrong checksum")
        size = _number(header[124:136])
        kind = header[156:157]
        data = f.read(size)
        if len(data) < size:
            raise TarDamaged(f"the tar ends inside a file ({len(data)} of {size} bytes)")
        f.read(-size % 512)  # the padding to the next block
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):  # pax: key=value records, of which path names the next member
            path = _pax_path(data)
            long_name = path if kind == b"x" and path else long_name
            continue
        name = long_name or _name(header)
        long_name = ""
        if kind not in (b"0", b"\0", b"7") or _META.match(name):
            continue
        yield {"fname": name, "data": data}


_ZERO_BLOCK = bytes(512)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata names, which it skips too


def _number(field: bytes) -> int:
    """A tar number field: octal ASCII, or base-256 when its first byte has the high bit set."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    return int(digits, 8) if digits else 0


def _checksum(header: bytes) -> int:
    """The header's checksum: the sum of its bytes with the checksum field taken as spaces."""
    return sum(header[:148]) + 8 * 32 + sum(header[156:])


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _pax_path(data: bytes) -> str:
    """The ``path`` of pax extended-header records (``LEN key=value\\n``), or ""."""
    path = ""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path
