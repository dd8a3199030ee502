"""What evaluation needs of a labelled image data set, as typing Protocols; the check of a pair; a
labelled data set cut into a reference and a query part.

The pretraining package's ``ImageFolderDataset`` satisfies :class:`LabelledImages`; evaluation only
relies on the members named here, so it never imports that package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


class Images(Protocol):
    """A data set of ``(uint8 (3, S, S) image, label)`` items."""

    @property
    def image_size(self) -> int:
        """Side S of the square images."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]: ...


class LabelledImages(Images, Protocol):
    """:class:`Images` with an index (files, labels, classes) and a content fingerprint."""

    @property
    def index(self) -> ClassIndex:
        """The files, labels and classes of the items."""
        ...

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


@dataclass(frozen=True)
class SubsetIndex:
    """The :class:`ClassIndex` of some items of a data set."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


class LabelledSubset:
    """Some items of a labelled data set, as a data set of their own (what evaluation reads)."""

    def __init__(self, dataset: LabelledImages, items: Sequence[int], name: str) -> None:
        """Selects ``items`` of ``dataset``; ``name`` tells the part apart (messages, feature cache)."""
        self.dataset, self.items, self.name = dataset, list(items), name
        index = dataset.index
        self.index = SubsetIndex(
            root=Path(f"{index.root}#{name}"),
            files=tuple(index.files[i] for i in self.items),
            labels=tuple(index.labels[i] for i in self.items),
            classes=tuple(index.classes),
        )
        self.image_size = dataset.image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.items[i]]

    def fingerprint(self) -> str:
        """The data set's fingerprint, the part's name and its items."""
        return f"{self.dataset.fingerprint()}:{self.name}:{hash(tuple(self.items))}"


def split_by_class(
    dataset: LabelledImages, query_fraction: float = 0.2, seed: int = 0
) -> tuple[LabelledSubset, LabelledSubset]:
    """A labelled data set cut into a reference and a query part (``twinview evaluate --data`` on a
    labelled source).

    Each class gives a seeded ``query_fraction`` of its images (at least one, when it has two) to the
    query part and the rest to the reference part; unlabelled items go to neither.

    Raises:
        ValueError: If the data set has no labels.
    """
    if not dataset.index.labeled:
        raise ValueError(f"'{dataset.index.root}' has no class labels to split by.")
    labels = torch.tensor(list(dataset.index.labels))
    g = torch.Generator().manual_seed(seed)
    query: list[int] = []
    for c in labels.unique().tolist():
        if c < 0:
            continue
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        query += members[: max(1, round(query_fraction * len(members))) if len(members) > 1 else 0].tolist()
    reference = sorted(set((labels >= 0).nonzero().squeeze(1).tolist()) - set(query))
    return LabelledSubset(dataset, reference, "reference"), LabelledSubset(dataset, sorted(query), "query")
