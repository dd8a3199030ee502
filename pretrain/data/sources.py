"""Image-folder source: walk, decode and resize on the CPU; everything else happens on the device.

Workers only decode (PIL) and resize to a fixed square, returning uint8 CHW tensors, so a batch is a
small uint8 tensor to move to the accelerator, where the views are made.
"""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from twinview.pretrain.data.builtin import resolve_path
from twinview.pretrain.data.decode import BadImage, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FILE_LIST_SUFFIXES = (".txt", ".csv")
T = TypeVar("T")
UNLABELED = -1


@dataclass(frozen=True)
class FolderIndex:
    """The images found under a folder, with labels when the folder is organised by class.

    Attributes:
        root: The folder that was walked.
        files: Image paths, sorted.
        labels: Class index per file, or ``UNLABELED`` (-1) for every file when unlabeled.
        classes: Class names (first-level sub-folder names, sorted); empty when unlabeled.
    """

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def labeled(self) -> bool:
        """Whether the files carry class labels."""
        return bool(self.classes)


def scan_folder(path: str | Path) -> FolderIndex:
    """Walks a folder recursively for images and derives labels from first-level sub-folders.

    Extensions are matched case-insensitively against ``IMAGE_EXTENSIONS``. When every image lies
    inside a first-level sub-folder, that sub-folder's name is its class; otherwise the folder is
    treated as unlabeled (labels are only used for evaluation).

    Args:
        path: A directory, or a ``builtin:`` data set name.

    Returns:
        The folder's index.

    Raises:
        FileNotFoundError: If the path does not exist.
        NotADirectoryError: If it is not a directory.
        ValueError: If it contains no images.
    """
    root = resolve_path(str(path))
    if not root.exists():
        raise FileNotFoundError(f"data path '{root}' does not exist.")
    if not root.is_dir():
        raise NotADirectoryError(f"data path '{root}' is not a directory of images.")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath) / f for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    if not files:
        raise ValueError(f"no images under '{root}' (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case).")
    files.sort()
    relative = [f.relative_to(root).parts for f in files]
    if all(len(parts) >= 2 for parts in relative):
        classes = tuple(sorted({parts[0] for parts in relative}))
        lookup = {name: i for i, name in enumerate(classes)}
        labels = tuple(lookup[parts[0]] for parts in relative)
    else:
        classes, labels = (), (UNLABELED,) * len(files)
    return FolderIndex(root=root, files=tuple(files), labels=labels, classes=classes)


def scan_file_list(path: Path) -> FolderIndex:
    """Reads a ``.txt`` or ``.csv`` list: one image path per line, optionally ``,label``.

    Relative paths are relative to the list's folder. A first CSV row whose second column is
    ``label`` is a header. Labels are any strings; they are numbered in sorted order.
    """
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and r[0].strip() and not r[0].startswith("#")]
    if rows and len(rows[0]) > 1 and rows[0][1].strip().lower() == "label":
        rows = rows[1:]
    if not rows:
        raise ValueError(f"the file list '{path}' names no images.")
    files = tuple(
        (path.parent / r[0].strip()).resolve() if not Path(r[0].strip()).is_absolute() else Path(r[0].strip())
        for r in rows
    )
    names = [r[1].strip() for r in rows if len(r) > 1 and r[1].strip()]
    if names and len(names) != len(rows):
        raise ValueError(f"'{path}': some lines have a label and some do not; label all of them or none.")
    if not names:
        return FolderIndex(root=path, files=files, labels=(UNLABELED,) * len(files), classes=())
    classes = tuple(sorted(set(names)))
    lookup = {name: i for i, name in enumerate(classes)}
    return FolderIndex(root=path, files=files, labels=tuple(lookup[n] for n in names), classes=classes)


def scan_source(path: str | Path) -> FolderIndex:
    """An image folder (walked recursively) or a ``.txt`` / ``.csv`` file list."""
    resolved = resolve_path(str(path))
    if resolved.is_file() and resolved.suffix.lower() in FILE_LIST_SUFFIXES:
        return scan_file_list(resolved)
    return scan_folder(path)


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
        self, path: str | Path, image_size: int, strict: bool = False, skip_log: SkipLog | None = None
    ) -> None:
        """Indexes the source.

        Args:
            path: A directory (walked recursively), a ``.txt``/``.csv`` file list or a ``builtin:`` name.
            image_size: Side of the returned square images.
            strict: Raise on the first bad file instead of skipping it.
            skip_log: Where skipped files are recorded (none: only counted in ``self.bad``).
        """
        self.index = scan_source(path)
        self.image_size, self.strict, self.skip_log = image_size, strict, skip_log
        self.bad: dict[int, str] = {}  # this process's known bad items and their reasons

    def __len__(self) -> int:
        return len(self.index.files)

    def fingerprint(self) -> str:
        """A hash of the files, their sizes and mtimes, the labels and the image size (the decoded
        cache's key): it changes whenever the items would."""
        from twinview.pretrain.data.cache import cache_key  # cache.py imports this module

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
    deaf to SIGTERM/SIGINT: launchers (torchrun, SLURM) and Ctrl-C signal the whole process group,
    and a worker killed by it would crash the loop before it can checkpoint. The DataLoader stops
    its workers itself (and they exit when the training process dies)."""
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
