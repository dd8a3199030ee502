"""Linear probe: separable features are learned, the weight decay is chosen on validation data."""

from __future__ import annotations

import torch

from twinview.evaluate.linear_probe import _stratified_split, linear_probe


def _blobs(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, 16, generator=g), y


def test_probe_learns_separable_classes_and_fails_on_noise() -> None:
    train = _blobs(400, 0, 1.0)
    test = _blobs(200, 1, 1.0)
    result = linear_probe(*train, *test, epochs=50)
    assert result.top1 > 0.95 and result.top5 == 1.0
    assert result.weight_decay in (0.0, 1e-4, 1e-3, 1e-2) and len(result.val_top1_by_weight_decay) == 4
    noise_x = torch.randn(400, 16, generator=torch.Generator().manual_seed(5))
    chance = linear_probe(noise_x, train[1], torch.randn(200, 16), test[1], epochs=50)
    assert chance.top1 < 0.45  # 4 classes: ~0.25 expected from features without signal


def test_stratified_split_keeps_every_class_in_both_parts() -> None:
    y = torch.tensor([0] * 20 + [1] * 10 + [2] * 2)
    tr, va = _stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(32))
    assert [int((y[va] == c).sum()) for c in range(3)] == [4, 2, 0] or [int((y[va] == c).sum()) for c in range(3)] == [
        4,
        2,
        1,
    ]
