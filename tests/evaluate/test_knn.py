"""Weighted kNN against a brute-force loop and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from twinview.evaluate.knn import knn_accuracy, knn_scores


def knn_scores_loop(train_x, train_y, test_x, num_classes, k, t):
    """Brute force: sort all training samples by cosine similarity, let the top k vote."""
    out = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_x.double()):
        pairs = zip(train_x, train_y, strict=True)
        sims = [(float(q @ x.double() / (q.norm() * x.double().norm())), int(y)) for x, y in pairs]
        sims.sort(key=lambda s: -s[0])
        for sim, label in sims[:k]:
            out[i, label] += math.exp(sim / t)
    return out


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.07), (20, 0.5), (100, 0.1)])
def test_scores_match_brute_force(k: int, t: float) -> None:
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(60, 7, generator=g), torch.randn(13, 7, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    fast = knn_scores(train_x, train_y, test_x, 4, k=k, temperature=t, chunk_size=5)
    slow = knn_scores_loop(train_x, train_y, test_x, 4, min(k, 60), t)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-6)


def test_hand_computed_vote() -> None:
    # Query (1, 0). Neighbours: (1, 0) class 0 (cos 1), (0, 1) class 1 (cos 0), (-1, 0) class 1 (cos -1).
    train_x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    train_y = torch.tensor([0, 1, 1])
    scores = knn_scores(train_x, train_y, torch.tensor([[5.0, 0.0]]), 2, k=3, temperature=1.0)
    torch.testing.assert_close(scores, torch.tensor([[math.e, 1.0 + math.exp(-1.0)]]))
    # Class 1 outvotes class 0 once the temperature is high enough: 2 votes of ~1 beat one of ~1.
    scores = knn_scores(train_x, train_y, torch.tensor([[5.0, 0.0]]), 2, k=3, temperature=100.0)
    assert scores.argmax().item() == 1


def test_accuracy_top1_top5() -> None:
    # Six reference points at 0, 10, ..., 50 degrees with labels 0..5; every query sits at 0 degrees,
    # so the classes rank strictly 0 > 1 > ... > 5 for every query.
    angles = torch.deg2rad(torch.arange(6) * 10.0)
    train_x = torch.stack([angles.cos(), angles.sin()], dim=1)
    train_y = torch.arange(6)
    test_x = torch.tensor([[2.0, 0.0]]).repeat(3, 1)
    test_y = torch.tensor([0, 4, 5])  # top-1 hit; top-5 hit only; miss
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=6, temperature=0.1)
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top5"] == pytest.approx(2 / 3)
