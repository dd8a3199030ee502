"""What evaluation needs of a labelled image data set, as typing Protocols, and the check of a pair.

The pretraining package's ``ImageFolderDataset`` satisfies :class:`LabelledImages`; evaluation only
relies on the members named here, so it never imports that package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch


class ClassIndex(Protocol):
    """The files of a data set: where they were found, their labels and the class names."""

    @property
    def root(self) -> Path:
        """The folder (or file list) the data set was read from."""
        ...

    @property
    def files(self) -> Sequence[Path]:
        """Path of every item (or ``source#row`` for rows of a Hugging Face source), in item order."""
        ...

    @property
    def labels(self) -> Sequence[int]:
        """Class index of every item, in item order."""
        ...

    @property
    def classes(self) -> Sequence[str]:
        """Class names; empty when the data set is unlabeled."""
        ...

    @property
    def labeled(self) -> bool:
        """Whether the items carry class labels."""
        ...


class LabelledImages(Protocol):
    """A data set of ``(uint8 (3, S, S) image, label)`` items with an index and a content fingerprint."""

    @property
    def index(self) -> ClassIndex:
        """The files, labels and classes of the items."""
        ...

    @property
    def image_size(self) -> int:
        """Side S of the square images."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]: ...

    def fingerprint(self) -> str:
        """A string that changes whenever the items would (files, labels, image size)."""
        ...


def check_labelled_pair(
    reference: LabelledImages, query: LabelledImages, names: tuple[str, str] = ("reference", "query")
) -> None:
    """Checks that both data sets are labelled, with the same class names.

    Args:
        reference: The labelled reference (gallery, kNN memory) set.
        query: The labelled query set.
        names: How the two are called in the messages (e.g. the command-line options).

    Raises:
        ValueError: If a data set is unlabeled or the class names differ.
    """
    for name, dataset in zip(names, (reference, query), strict=True):
        if not dataset.index.labeled:
            raise ValueError(f"{name} '{dataset.index.root}' has no class sub-folders; kNN needs labels.")
    if list(reference.index.classes) != list(query.index.classes):
        raise ValueError(
            f"class folders differ: {names[0]} has {list(reference.index.classes)}, "
            f"{names[1]} has {list(query.index.classes)}."
        )
