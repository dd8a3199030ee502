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
        classes_per_batch: P, at most the number of classes (checked by validate_data).
        samples_per_class: K >= 1.
        seed: Base seed of the per-epoch generator.
        """
        self.by_class = [torch.tensor(idx) for idx in _group(labels)]  # P <= classes: twinview.pretrain.validate
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
