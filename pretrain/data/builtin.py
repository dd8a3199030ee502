"""Built-in data sets and the cache directory they live in.

``builtin:digits`` is the embedded default data set: scikit-learn's ``load_digits`` (1,797 real 8x8
handwritten digits that ship inside scikit-learn, so no download), written once as an image folder
``digits/{train,test}/<digit>/NNNN.png`` upscaled to 32x32. :func:`extract_archive` unpacks an image
archive (such as CIFAR-10 as JPEGs) into the same cache, once.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_PREFIX = "builtin:"
DIGITS_SIZE = 32
DIGITS_TEST_PER_CLASS = 30


def cache_dir() -> Path:
    """Returns twinview's cache directory (``$TWINVIEW_CACHE``, else ``$XDG_CACHE_HOME/twinview``)."""
    env = os.environ.get("TWINVIEW_CACHE")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twinview"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _publish(tmp: Path, final: Path) -> None:
    """Moves a fully written temporary directory into place; a concurrent winner is kept."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def materialize_digits(root: Path | None = None) -> Path:
    """Writes scikit-learn's digits as a PNG image folder, once, and returns its directory.

    The split is stratified and fixed: the first 30 images of each digit (in scikit-learn's order)
    form ``test`` (300 images), the rest ``train`` (1,497 images). Pixels (0..16) are scaled to
    0..255 and upscaled with bicubic interpolation to 32x32 grayscale PNGs.

    Args:
        root: Parent directory; defaults to :func:`cache_dir`.

    Returns:
        The ``digits`` directory, holding ``train/`` and ``test/``.
    """
    from sklearn.datasets import load_digits

    root = root or cache_dir()
    final = root / "digits"
    if (final / ".complete").is_file():
        return final
    data = load_digits()
    images = np.clip(data.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    seen: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(images, data.target, strict=True)):
        label = int(label)
        rank = seen.get(label, 0)
        seen[label] = rank + 1
        split = "test" if rank < DIGITS_TEST_PER_CLASS else "train"
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
        big.save(folder / f"{index:04d}.png")
    (tmp / ".complete").touch()
    _publish(tmp, final)
    return final


def extract_archive(archive: Path, root: Path | None = None) -> Path:
    """Extracts a ``.tar``/``.tar.gz`` archive into the cache once and returns the extraction dir.

    Extraction goes to a temporary directory that is renamed into place when complete, so an
    interrupted extraction is never mistaken for a finished one.

    Args:
        archive: The archive file.
        root: Parent directory; defaults to :func:`cache_dir`.

    Returns:
        ``root/<archive name without .tar.gz>``, containing the archive's members.
    """
    archive = Path(archive)
    root = root or cache_dir()
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    final = root / f"{name}.extracted"
    if (final / ".complete").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ".complete").touch()
    _publish(tmp, final)
    return final


def resolve_path(path: str) -> Path:
    """Turns ``data.path`` into a directory: a plain path, or ``builtin:NAME[:SPLIT]``.

    ``builtin:digits`` is the digits training split and ``builtin:digits:test`` its test split.

    Args:
        path: The user's ``data.path`` (or ``--train``/``--test`` argument).

    Returns:
        The directory to read images from.

    Raises:
        ValueError: For an unknown built-in name or split.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return Path(path).expanduser()
    name, _, split = path[len(BUILTIN_PREFIX) :].partition(":")
    split = split or "train"
    if name != "digits":
        raise ValueError(f"unknown built-in data set '{name}'. Built-in: digits.")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}' of builtin:digits. Splits: train, test.")
    return materialize_digits() / split
