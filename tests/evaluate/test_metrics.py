"""Retrieval, verification and diagnostics against brute force and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinview.evaluate.metrics import (
    alignment,
    collapse_warning,
    effective_rank,
    retrieval_metrics,
    uniformity,
    verification_metrics,
)


def _loop_retrieval(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = {f"recall@{k}": 0.0 for k in ks}
    p1, aps = 0.0, []
    for i in range(len(x)):
        sims = [(x[i] @ x[j], j) for j in range(len(x)) if j != i]
        ranked = [j for _, j in sorted(sims, key=lambda t: -t[0])]
        rel = [y[j] == y[i] for j in ranked]
        for k in ks:
            out[f"recall@{k}"] += any(rel[:k]) / len(x)
        p1 += rel[0] / len(x)
        r = sum(rel)
        if r:
            aps.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    out["precision@1"] = p1
    out["map@r"] = float(np.mean(aps))
    return out


def test_retrieval_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = rng.integers(0, 4, 40)
    got = retrieval_metrics(torch.tensor(x), torch.tensor(y))
    for key, value in _loop_retrieval(x, y, (1, 5, 10)).items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_retrieval_hand_values_with_a_gallery() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.1], [0.9, -0.2], [0.0, 1.0], [0.2, 1.0]])
    # query 0 (label 0): ranked 0 (label 0), 1 (1), 3 (1), 2 (0); R = 2 -> AP = (1/2) * (1/1) = 0.5
    # query 1 (label 1): ranked 2 (label 0), 3 (1), 0 (0), 1 (1); R = 2 -> AP = (1/2) * (1/2) = 0.25
    got = retrieval_metrics(q, torch.tensor([0, 1]), g, torch.tensor([0, 1, 0, 1]), ks=(1, 2))
    assert got["precision@1"] == 0.5 and got["recall@1"] == 0.5 and got["recall@2"] == 1.0
    assert got["map@r"] == pytest.approx((0.5 + 0.25) / 2)


def _brute_force_verification(scores: np.ndarray, same: np.ndarray, far: float) -> dict[str, float]:
    """ROC AUC as P(genuine > impostor) + P(=)/2 over every pair of pairs; TAR@FAR and EER by trying
    every threshold t (accept when score >= t), starting from "accept nothing"."""
    pos, neg = scores[same], scores[~same]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    points = [(0.0, 0.0)] + [
        (float((neg >= t).mean()), float((pos >= t).mean())) for t in sorted(set(scores), reverse=True)
    ]
    tar = max(t for f, t in points if f <= far)
    eer_far, eer_tar = min(points, key=lambda p: abs(p[0] - (1 - p[1])))
    return {"roc_auc": auc, "eer": (eer_far + 1 - eer_tar) / 2, f"tar@far={far:g}": tar}


def test_verification_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    same = rng.random(2000) < 0.3
    scores = rng.normal(size=2000) + 1.5 * same
    scores[:50] = np.round(scores[:50], 1)  # some ties
    for far in (0.01, 0.1):
        got = verification_metrics(torch.tensor(scores), torch.tensor(same), far=far)
        for key, value in _brute_force_verification(scores, same, far).items():
            assert got[key] == pytest.approx(value, abs=1e-9), key


def test_verification_ties_count_half() -> None:
    # one genuine and one impostor pair with the same score: the ROC goes (0, 0) -> (1, 1) in one step
    got = verification_metrics(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert got["roc_auc"] == 0.5 and got["eer"] == 0.5 and got["tar@far=0.001"] == 0.0


def test_verification_hand_values() -> None:
    got = verification_metrics(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([True, True, False, False]))
    assert got["roc_auc"] == 1.0 and got["eer"] == 0.0 and got["tar@far=0.001"] == 1.0
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_metrics(torch.tensor([0.5]), torch.tensor([True]))


def test_alignment_uniformity_and_rank_hand_values() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert alignment(a, a) == 0.0
    assert alignment(a, -a) == pytest.approx(4.0)  # antipodal: ||.||^2 = 4
    # two orthogonal unit vectors: one pair at squared distance 2 -> log exp(-2 * 2) = -4
    assert uniformity(a) == pytest.approx(-4.0)
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0, rel=1e-6)
    collapsed = torch.ones(100, 8) + 1e-6 * torch.randn(100, 8)
    assert effective_rank(collapsed) < 1.1 and "collapsed" in collapse_warning(collapsed)
    assert collapse_warning(torch.randn(100, 8)) is None
    assert math.isfinite(uniformity(torch.randn(50, 4)))
