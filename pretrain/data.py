"""Image-folder source: walk, decode and resize on the CPU; everything else happens on the device.

Workers only decode (PIL) and resize to a fixed square, returning uint8 CHW tensors, so a batch is a
small uint8 tensor to move to the accelerator, where the views are made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from twinview.pretrain.datasets import resolve_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
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
        raise ValueError(
            f"no images under '{root}' (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)."
        )
    files.sort()
    relative = [f.relative_to(root).parts for f in files]
    if all(len(parts) >= 2 for parts in relative):
        classes = tuple(sorted({parts[0] for parts in relative}))
        lookup = {name: i for i, name in enumerate(classes)}
        labels = tuple(lookup[parts[0]] for parts in relative)
    else:
        classes, labels = (), (UNLABELED,) * len(files)
    return FolderIndex(root=root, files=tuple(files), labels=labels, classes=classes)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decodes an image to RGB, resizes its shorter side to ``size`` and centre-crops a square.

    Args:
        path: Image file.
        size: Output side in pixels.

    Returns:
        A ``(3, size, size)`` uint8 tensor.
    """
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger than needed
        img = img.convert("RGB")
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Decoded, resized images of a folder as ``(uint8 (3,S,S) tensor, label)`` pairs."""

    def __init__(self, path: str | Path, image_size: int) -> None:
        """Indexes the folder.

        Args:
            path: A directory (walked recursively) or a ``builtin:`` data set name.
            image_size: Side of the returned square images.
        """
        self.index = scan_folder(path)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.index.files[i], self.image_size), self.index.labels[i]


def worker_init(_: int) -> None:
    """Keeps each decoding worker single-threaded so workers do not fight the training step."""
    torch.set_num_threads(1)
