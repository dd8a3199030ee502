"""Retrieval, verification and diagnostics against brute force, scikit-learn and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from twinview.evaluate.metrics import alignment, collapse_warning, effective_rank, retrieval_metrics, uniformity, verification_metrics


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


def test_verification_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    same = rng.random(2000) < 0.3
    scores = rng.normal(size=2000) + 1.5 * same
    scores[:50] = np.round(scores[:50], 1)  # some ties
    got = verification_metrics(torch.tensor(scores), torch.tensor(same), far=0.01)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
    fpr, tpr, _ = roc_curve(same, scores)
    assert got["tar@far=0.01"] == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-9)
    i = np.argmin(np.abs(fpr - (1 - tpr)))
    assert got["eer"] == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=2e-3)


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


def test_features_are_cached_per_split_and_reused(image_folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from twinview.evaluate import report
    from twinview.pretrain.config import load_config

    cfg = load_config(None, [f"data.path={image_folder}", "data.image_size=24", "data.num_workers=0", "eval.knn_k=5"])
    backbone = report.random_init_backbone(cfg)
    first = report.evaluate_knn(backbone, cfg, str(image_folder), str(image_folder), features_dir=tmp_path / "f")
    cached = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert len(cached) == 1  # train and test are the same folder: one entry
    calls = []
    original = report.extract_features
    report.extract_features = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[assignment]
    try:
        second = report.evaluate_knn(backbone, cfg, str(image_folder), str(image_folder), features_dir=tmp_path / "f")
    finally:
        report.extract_features = original  # type: ignore[assignment]
    assert not calls and second["knn_top1"] == first["knn_top1"]
