"""What every kind of source shares: the kinds, and the index of a folder or file list (its files,
labels and classes) with the content key that changes whenever its items would.

A leaf module: the sources, the loaders, the cache and the ``datasets`` readers all import it, and
it imports nothing of theirs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

FOLDER, FILE_LIST, HF, SHARDS = "folder", "file list", "Hugging Face data set", "tar shards"
HF_PREFIX = "hf:"  # data.path=hf:owner/name, hf:imagefolder:/dir
UNLABELED = -1
CACHE_VERSION = 1  # of the decoded cache's layout; part of its key


@dataclass(frozen=True)
class FolderIndex:
    """The images found under a folder or in a file list, with labels when there are classes.

    Attributes:
        root: The folder that was walked (or the file list).
        files: Image paths, sorted (a file list keeps its order).
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


def cache_key(index: FolderIndex, size: int) -> str:
    """Hash of what the cache depends on: files, their sizes and mtimes, labels, size, version."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}:".encode())
    for f, label in zip(index.files, index.labels, strict=True):
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{f}\0{stamp}\0{label}\n".encode())
    return h.hexdigest()[:32]
