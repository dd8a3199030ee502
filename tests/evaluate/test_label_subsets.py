"""Label budgets: parsed or refused with the option named; subsets class-balanced, seeded, nested."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from twinview.evaluate.label_subsets import LabelBudget, balanced_subset, parse_budgets

# 3 classes of 100, 40 and 7 items, interleaved
LABELS = [0] * 100 + [1] * 40 + [2] * 7
RNG_ORDER = np.random.default_rng(5).permutation(len(LABELS))
SHUFFLED = [LABELS[i] for i in RNG_ORDER]


def test_parse_budgets() -> None:
    budgets = parse_budgets("1%, 10%,100%,5/class")
    assert [(b.text, b.fraction, b.per_class) for b in budgets] == [
        ("1%", 0.01, None),
        ("10%", 0.1, None),
        ("100%", 1.0, None),
        ("5/class", None, 5),
    ]


@pytest.mark.parametrize("text", ["0%", "101%", "ten%", "0/class", "5", "", "10%,10%"])
def test_bad_budgets_are_refused_naming_the_option(text: str) -> None:
    with pytest.raises(ValueError, match="--labels"):
        parse_budgets(text)


@pytest.mark.parametrize(
    ("budget", "counts"),
    [
        ("10%", [10, 4, 1]),
        ("50%", [50, 20, 4]),
        ("100%", [100, 40, 7]),
        ("5/class", [5, 5, 5]),
        ("20/class", [20, 20, 7]),
    ],
)
def test_each_class_keeps_its_share(budget: str, counts: list[int]) -> None:
    idx = balanced_subset(SHUFFLED, parse_budgets(budget)[0], seed=0)
    assert np.bincount(np.asarray(SHUFFLED)[idx], minlength=3).tolist() == counts
    assert len(set(idx.tolist())) == len(idx) and np.all(np.diff(idx) > 0)  # sorted, no repeats


def test_subsets_are_seeded_and_nested() -> None:
    budgets = parse_budgets("1/class,10%,30%,60%,100%")
    subsets = [set(balanced_subset(SHUFFLED, b, seed=3).tolist()) for b in budgets]
    for small, large in itertools.pairwise(subsets):
        assert small <= large
    again = [set(balanced_subset(SHUFFLED, b, seed=3).tolist()) for b in budgets]
    assert subsets == again
    other = set(balanced_subset(SHUFFLED, budgets[2], seed=4).tolist())
    assert other != subsets[2]  # another seed, another subset (same sizes)
    assert len(other) == len(subsets[2])


def test_a_fraction_too_small_for_a_class_is_refused_with_what_would_work() -> None:
    with pytest.raises(ValueError, match=r"--labels 5%: keeps no image of class 'c' \(7 images\).*7.15%.*1/class"):
        balanced_subset(SHUFFLED, LabelBudget("5%", fraction=0.05), seed=0, class_names=["a", "b", "c"])
    assert len(balanced_subset(SHUFFLED, LabelBudget("7.15%", fraction=0.0715), seed=0)) == 7 + 3 + 1
