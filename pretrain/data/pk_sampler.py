"""Class-balanced P x K batches for supervised metric learning: P classes, K images of each.

Every batch then has positives for every anchor (SupCon, triplet mining, contrastive pairs), which
random batches over many classes do not guarantee.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Yields ``num_batches`` batches of ``P * K`` dataset indices per epoch.

    Each batch draws P distinct classes uniformly, then K images of each class without replacement
    (with replacement for a class that has fewer than K images). Reproducible from ``seed`` and
    the epoch (``set_epoch``).
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, samples_per_class: int, seed: int = 0) -> None:
        """Args:
        labels: The class index of every dataset item.
        classes_per_batch: P (at most the number of classes).
        samples_per_class: K >= 1.
        seed: Base seed of the per-epoch generator.
        """
        self.by_class = [torch.tensor(idx) for idx in _group(labels)]
        if classes_per_batch > len(self.by_class):
            raise ValueError(
                f"a P x K batch needs {classes_per_batch} classes but the data has {len(self.by_class)}; "
                f"lower train.batch_size or raise data.samples_per_class."
            )
        if samples_per_class < 1:
            raise ValueError(f"data.samples_per_class must be >= 1, got {samples_per_class}.")
        self.p, self.k, self.seed, self.epoch = classes_per_batch, samples_per_class, seed, 0
        self.num_batches = max(1, len(labels) // (classes_per_batch * samples_per_class))

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's random stream."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in torch.randperm(len(self.by_class), generator=g)[: self.p].tolist():
                members = self.by_class[c]
                if len(members) >= self.k:
                    pick = members[torch.randperm(len(members), generator=g)[: self.k]]
                else:
                    pick = members[torch.randint(len(members), (self.k,), generator=g)]
                batch += pick.tolist()
            yield batch


def _group(labels: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return [groups[c] for c in sorted(groups)]
