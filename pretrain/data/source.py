"""A command's data source, resolved once: what a path names, its files and labels, and a survey of
its images, passed down to the checks, the loaders and the start of a run.

``data.path`` (and ``--data``, ``--train``, ``--test``, ``eval.monitor_train/test``) names one of:

* an image folder, walked recursively (first-level sub-folders are classes), or ``builtin:digits``;
* a ``.txt`` / ``.csv`` file list, ``path[,label]`` per line;
* a Hugging Face source: ``hf:owner/name``, ``hf:imagefolder:/dir``, a ``save_to_disk`` folder,
  ``.parquet`` / ``.arrow`` files; read map-style, or streamed with ``data.streaming=true``;
* WebDataset tar shards: ``train-{000000..000999}.tar``, a glob or one ``.tar``; always streamed.

:func:`resolve_source` is the one place that reads the path: it tells the kind, walks a folder once
(or lists the shards, or opens the Hugging Face data set once) and surveys a sample of the images
(:mod:`twinview.pretrain.data.survey`). Everything below a command takes the :class:`Source`. This
module imports neither torch nor ``datasets``, so the checks can read a Source cheaply.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from braceexpand import braceexpand

from twinview.pretrain.data.builtin import BUILTIN_PREFIX, resolve_path
from twinview.pretrain.data.index import FILE_LIST, FOLDER, HF, HF_PREFIX, SHARDS, UNLABELED, FolderIndex
from twinview.pretrain.data.survey import DataSurvey, auto_image_size, survey_files, survey_rows

if TYPE_CHECKING:
    from twinview.pretrain.config import Config, DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FILE_LIST_SUFFIXES = (".txt", ".csv")
TABLE_SUFFIXES = (".parquet", ".arrow")
SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class Source:
    """A resolved data source.

    Attributes:
        path: The path as given (``data.path``, ``--data``, ...).
        kind: :data:`FOLDER`, :data:`FILE_LIST`, :data:`HF` or :data:`SHARDS`.
        index: The files, labels and classes of a folder or file list (walked once).
        shards: The shard files of tar shards (listed once), sorted.
        split: The split of a Hugging Face source.
        streaming: Read as a stream: a Hugging Face source with ``data.streaming``; shards always.
        image_column: The image column of a Hugging Face source or field of a shard (empty: the
            one image feature).
        label_column: Its label column (empty: the one class-label feature, if any).
        survey: Counts and sizes found (None when not surveyed).
        table: A Hugging Face source's ``datasets`` data set, opened once (map-style, or iterable
            when streamed); None for the other kinds.
    """

    path: str
    kind: str
    index: FolderIndex | None = None
    shards: tuple[str, ...] = ()
    split: str = "train"
    streaming: bool = False
    image_column: str = ""
    label_column: str = ""
    survey: DataSurvey | None = None
    table: Any = None

    @property
    def read_by_datasets(self) -> bool:
        """Read through Hugging Face ``datasets`` (a Hugging Face source or tar shards)."""
        return self.kind in (HF, SHARDS)

    @property
    def streamed(self) -> bool:
        """Read as an endless stream (tar shards, or a Hugging Face source with ``data.streaming``)."""
        return self.kind == SHARDS or (self.kind == HF and self.streaming)

    @property
    def files(self) -> FolderIndex:
        """The index of a folder or file list.

        Raises:
            ValueError: For a Hugging Face source or shards, which have rows, not files.
        """
        if self.index is None:
            raise ValueError(f"'{self.path}' is a {self.kind}, not an image folder or file list.")
        return self.index


def source_kind(path: str) -> str:
    """What kind of source ``path`` names (see the module docstring); nothing is read but the
    directory entries that tell a saved Hugging Face data set from an image folder."""
    if path.startswith(HF_PREFIX):
        return HF
    if path.lower().endswith(SHARD_SUFFIX):
        return SHARDS
    if path.startswith(BUILTIN_PREFIX):
        return FOLDER
    p = Path(path).expanduser()
    if p.is_dir():
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        return HF if any((p / name).is_file() for name in saved) else FOLDER
    if path.lower().endswith(TABLE_SUFFIXES):
        return HF
    if p.is_file() and p.suffix.lower() in FILE_LIST_SUFFIXES:
        return FILE_LIST
    return FOLDER  # scanning it says what is wrong (missing, not a directory)


def resolve_source(
    path: str,
    *,
    split: str = "train",
    streaming: bool = False,
    image_column: str = "",
    label_column: str = "",
    survey: bool = True,
) -> Source:
    """Resolves a path once: its kind, its files (or shards, or opened data set) and a survey.

    Args:
        path: Anything ``data.path`` accepts.
        split: Split of a Hugging Face source.
        streaming: Stream a Hugging Face source (shards are always streamed): only its first rows
            are read for the survey, so a hub source is not downloaded before training starts.
        image_column: Image column of a Hugging Face source (empty: the one image feature).
        label_column: Label column (empty: the one class-label feature, if any).
        survey: Sample the images' sizes and count them and their classes.

    Returns:
        The :class:`Source`.

    Raises:
        FileNotFoundError: A path, file list entry or shard that does not exist.
        NotADirectoryError: A path that is a file but not a file list or data file.
        ValueError: A folder without images, a malformed file list, an unknown built-in name.
    """
    kind = source_kind(path)
    if kind in (FOLDER, FILE_LIST):
        index = scan_file_list(Path(path).expanduser()) if kind == FILE_LIST else scan_folder(path)
        found = survey_files(path, index) if survey else None
        return Source(path, kind, index=index, split=split, streaming=streaming, survey=found)
    shards = tuple(shard_files(path)) if kind == SHARDS else ()
    streaming = streaming or kind == SHARDS
    if kind == SHARDS:  # shard by shard: a damaged one is left, not fatal
        from twinview.pretrain.data.shards import shard_rows  # datasets only for the sources that need it

        table, image, label = shard_rows(list(shards), image_column, label_column)
    else:
        from twinview.pretrain.data.hf import open_table

        table, image, label = open_table(path, kind, shards, split, streaming, image_column, label_column)
    found = survey_rows(path, table, image, label) if survey else None
    return Source(path, kind, None, shards, split, streaming, image, label or "", found, table)


def resolve_data(data: DataConfig) -> Source:
    """:func:`resolve_source` of a config's ``data`` section (path, split, streaming, columns), surveyed."""
    return resolve_source(
        data.path,
        split=data.split,
        streaming=data.streaming,
        image_column=data.image_column,
        label_column=data.label_column,
    )


@dataclass(frozen=True)
class ImageSize:
    """The side images are loaded at, and why.

    Attributes:
        pixels: The side in pixels.
        note: Where it came from, for the start of a run (e.g. ``96 px (data.image_size=auto: ...)``).
        auto: Chosen from the data (``data.image_size=auto``), not by a recipe or the user.
    """

    pixels: int
    note: str
    auto: bool


def resolve_image_size(cfg: Config, source: Source) -> tuple[Config, ImageSize]:
    """``data.image_size``, resolved once for every command (pretrain, preview, embed, evaluate):
    ``auto`` becomes the size :func:`~twinview.pretrain.data.survey.auto_image_size` picks from the
    source's survey; a size in pixels is kept.

    Returns:
        The config with ``data.image_size`` in pixels (saved so in a run's config.yaml), and the
        :class:`ImageSize` with its reason.
    """
    setting = cfg.data.image_size
    if setting != "auto":
        return cfg, ImageSize(int(setting), f"{setting} px (data.image_size)", auto=False)
    if source.survey is None:
        raise ValueError(f"data.image_size=auto needs a survey of '{source.path}'; resolve it with survey=True.")
    size, why = auto_image_size(source.survey)
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    return resolved, ImageSize(size, f"{size} px (data.image_size=auto: {why})", auto=True)


def shard_files(path: str) -> list[str]:
    """The shard files a pattern names: braces expanded (``{000..099}``, ``{a,b}``), then globbed.

    Args:
        path: A shard pattern.

    Returns:
        The existing files, sorted, each once.

    Raises:
        FileNotFoundError: When a name without wildcards does not exist, or nothing matches;
            the message names the first missing files.
    """
    found: set[str] = set()
    missing: list[str] = []  # names without wildcards that do not exist
    for name in braceexpand(str(Path(path).expanduser())):
        matches = glob.glob(name)
        found.update(matches)
        if not matches and not glob.has_magic(name):
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"data path '{path}': no shard file {', '.join(missing[:3])}{more}.")
    if not found:
        raise FileNotFoundError(f"data path '{path}': no files match.")
    return sorted(found)


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
