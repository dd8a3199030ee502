"""Labelled subsets for label-efficiency measurements: "1%", "10%", "100%" or "10/class" of a
labelled training set, class-balanced, seeded and nested.

Each class's items are put in one seeded random order; a budget takes the first
``round(fraction * class size)`` (or ``min(n, class size)`` for ``n/class``) of each class's order.
So every budget keeps each class's share of the set, the same seed gives the same subsets, and a
smaller budget's subset lies inside every larger one's (the 1 % set is inside the 10 % set), as in
the SimCLR paper's 1 % / 10 % ImageNet subsets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelBudget:
    """How many labels of each class to keep.

    Attributes:
        text: As written: ``"10%"`` or ``"5/class"``.
        fraction: Share of every class (``"10%"`` -> 0.1), or None.
        per_class: Items of every class (``"5/class"`` -> 5), or None.
    """

    text: str
    fraction: float | None = None
    per_class: int | None = None

    def count(self, class_size: int) -> int:
        """Items kept of a class with ``class_size`` items (round half up)."""
        if self.per_class is not None:
            return min(self.per_class, class_size)
        assert self.fraction is not None
        return min(class_size, math.floor(self.fraction * class_size + 0.5))


def parse_budgets(text: str, option: str = "--labels") -> list[LabelBudget]:
    """Parses ``"1%,10%,100%"`` or ``"10/class,100%"`` into budgets, smallest first.

    Raises:
        ValueError: Naming ``option`` and the part that is not a percentage in (0, 100] or a
            positive ``N/class``.
    """
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if part.endswith("%"):
                percent = float(part[:-1])
                if not 0 < percent <= 100:
                    raise ValueError
                budgets.append(LabelBudget(part, fraction=percent / 100))
            elif part.endswith("/class"):
                n = int(part[: -len("/class")])
                if n < 1:
                    raise ValueError
                budgets.append(LabelBudget(part, per_class=n))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{option}: '{part}' is neither a percentage in (0, 100] ('10%') nor a count per class ('10/class')."
            ) from None
    if not budgets:
        raise ValueError(f"{option}: give at least one budget, e.g. 1%,10%,100%")
    if len({b.text for b in budgets}) != len(budgets):
        raise ValueError(f"{option}: '{text}' names a budget twice.")
    return budgets


def class_orders(labels: Sequence[int], seed: int) -> list[np.ndarray]:
    """Each class's item indices in one seeded random order (class ``c`` at position ``c``)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    orders = []
    for c in range(int(y.max()) + 1 if len(y) else 0):
        members = np.flatnonzero(y == c)
        orders.append(members[rng.permutation(len(members))])
    return orders


def balanced_subset(
    labels: Sequence[int], budget: LabelBudget, seed: int, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """The sorted indices of ``budget``'s subset of a labelled set.

    Args:
        labels: Class of every item, in ``[0, C)``.
        budget: How many of each class.
        seed: The same seed gives the same (and nested) subsets.
        class_names: For the error message.

    Raises:
        ValueError: If the budget keeps no item of some class (a fraction too small for it).
    """
    orders = class_orders(labels, seed)
    picked = []
    for c, order in enumerate(orders):
        if len(order) == 0:
            continue
        n = budget.count(len(order))
        if n < 1:
            name = class_names[c] if class_names is not None else str(c)
            smallest = min(len(o) for o in orders if len(o))
            need = 100 / smallest / 2  # round half up: a share of at least half an item
            raise ValueError(
                f"--labels {budget.text}: keeps no image of class '{name}' ({len(order)} images); the smallest "
                f"class has {smallest}, so use at least {math.ceil(need * 100) / 100:g}% or a count such as 1/class."
            )
        picked.append(order[:n])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
