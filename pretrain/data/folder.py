"""Image folders and file lists as data sets: decode and resize on the CPU; everything else happens
on the device.

Workers only decode (PIL) and resize to a fixed square, returning uint8 CHW tensors, so a batch is a
small uint8 tensor to move to the accelerator, where the views are made. The files come from a
resolved source's index (:mod:`twinview.pretrain.data.source`). Also here: the skip log and the
replacement of a bad item, which the Hugging Face sources share.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from twinview.pretrain.data.decode import BadImage, decode_image
from twinview.pretrain.data.index import FolderIndex, cache_key

T = TypeVar("T")


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decodes an image to a ``(3, size, size)`` uint8 tensor (see :func:`decode_image`).

    Raises:
        BadImage: When the file cannot be used.
    """
    return torch.from_numpy(decode_image(path, size)).permute(2, 0, 1).contiguous()


class SkipLog:
    """Where data-loader workers record the files they skipped (one small file per process).

    Workers are separate processes, so each appends ``path<TAB>reason`` lines to its own file in
    ``directory``; the training loop gathers them with :meth:`collect` at the end of an epoch.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def record(self, path: Path, reason: str) -> None:
        with (self.directory / f"{os.getpid()}.tsv").open("a") as f:
            f.write(f"{path}\t{reason}\n")

    def collect(self) -> dict[str, str]:
        """Every recorded file and its reason (each file once)."""
        found: dict[str, str] = {}
        for part in sorted(self.directory.glob("*.tsv")):
            for line in part.read_text().splitlines():
                name, _, reason = line.partition("\t")
                found.setdefault(name, reason)
        return found


class ImageFolderDataset(Dataset):
    """Decoded, resized images of a folder or file list as ``(uint8 (3,S,S) tensor, label)`` pairs.

    A file that cannot be decoded is replaced by the next good one (so every batch keeps its size),
    recorded in the skip log with its reason, and never read again by this worker. With
    ``strict=True`` it raises instead.
    """

    def __init__(
        self, index: FolderIndex, image_size: int, strict: bool = False, skip_log: SkipLog | None = None
    ) -> None:
        """Args:
        index: The files and labels (a resolved source's ``index``, or :func:`scan_source`).
        image_size: Side of the returned square images.
        strict: Raise on the first bad file instead of skipping it.
        skip_log: Where skipped files are recorded (none: only counted in ``self.bad``).
        """
        self.index = index
        self.image_size, self.strict, self.skip_log = image_size, strict, skip_log
        self.bad: dict[int, str] = {}  # this process's known bad items and their reasons

    def __len__(self) -> int:
        return len(self.index.files)

    def fingerprint(self) -> str:
        """A hash of the files, their sizes and mtimes, the labels and the image size (the decoded
        cache's key): it changes whenever the items would."""
        return cache_key(self.index, self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return first_decodable(
            i,
            len(self),
            lambda j: (load_image(self.index.files[j], self.image_size), self.index.labels[j]),
            lambda j: self.index.files[j],
            self.bad,
            self.strict,
            self.skip_log,
        )


def first_decodable(
    i: int,
    n: int,
    load: Callable[[int], T],
    name: Callable[[int], Path],
    bad: dict[int, str],
    strict: bool,
    skip_log: SkipLog | None,
) -> T:
    """Item ``i``, or when it cannot be decoded the next one that can (so a batch keeps its size).

    A failing item is remembered in ``bad`` (never tried again by this process) and recorded in the
    skip log; with ``strict`` the first failure raises instead.

    Args:
        i: The requested item.
        n: Number of items.
        load: Loads item j; raises :class:`BadImage`.
        name: The file (or row) of item j, for messages.
        bad: This process's known bad items and their reasons (updated).
        strict: Raise on the first bad item.
        skip_log: Where skipped items are recorded.
    """
    for j in ((i + step) % n for step in range(n)):
        if j in bad:
            continue
        try:
            return load(j)
        except BadImage as err:
            if strict:
                strict_error = BadImage(f"{name(j)}: {err} (data.strict=true)")
                strict_error.reason = str(err)  # type: ignore[attr-defined]  # the reason alone, for lists
                raise strict_error from None
            bad[j] = str(err)
            if skip_log is not None:
                skip_log.record(name(j), str(err))
    raise BadImage(f"none of the {n} items could be decoded (see data.strict, skipped_files.txt)")


def worker_init(_: int) -> None:
    """Keeps each decoding worker single-threaded so workers do not fight the training step, and
    deaf to the stop signals (SIGTERM, SIGINT, SIGUSR1): launchers (torchrun, SLURM) and Ctrl-C signal
    the whole process group, and a worker killed by one would crash the loop before it can
    checkpoint. The DataLoader stops its workers itself (and they exit when the training process
    dies)."""
    torch.set_num_threads(1)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
