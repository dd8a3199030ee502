"""MoCo's parts: EMA key encoder, key queue, BN-leak-free key encoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twinview.pretrain.objectives.moco import KeyQueue, MomentumEncoder, cosine_momentum, encode_keys_without_bn_leak


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_momentum_zero_copies_and_one_freezes() -> None:
    online, other = _net(0), _net(1)
    key = MomentumEncoder(other)
    before = [p.clone() for p in key.encoder.parameters()]
    key.update(online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(key.encoder.parameters(), before, strict=True))
    key.update(online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(key.encoder.parameters(), online.parameters(), strict=True))


def test_momentum_update_is_the_ema_formula() -> None:
    online, start = _net(0), _net(1)
    key = MomentumEncoder(start)
    key.update(online, 0.9)
    for k, s, q in zip(key.encoder.parameters(), start.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(k, 0.9 * s + 0.1 * q)


def test_no_gradient_reaches_the_key_encoder() -> None:
    online = _net(0)
    key = MomentumEncoder(online)
    x = torch.randn(8, 4)
    loss = (online(x) * key(x)).sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in key.encoder.parameters())
    assert all(p.grad is not None for p in online.parameters())


def test_cosine_momentum_schedule_goes_from_base_to_final() -> None:
    assert cosine_momentum(0.99, 1.0, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0, 100, 100) == pytest.approx(1.0)


def test_queue_fills_in_order_and_wraps_around() -> None:
    queue = KeyQueue(size=6, dim=2)
    batches = [F.normalize(torch.randn(2, 2), dim=1) for _ in range(4)]
    for b in batches[:3]:
        queue.enqueue(b)
    torch.testing.assert_close(queue.keys, torch.cat(batches[:3]))
    assert int(queue.ptr) == 0
    queue.enqueue(batches[3])  # overwrites the oldest two
    torch.testing.assert_close(queue.keys, torch.cat([batches[3], batches[1], batches[2]]))
    assert int(queue.ptr) == 2


def test_queue_stores_normalised_keys_and_is_in_the_state_dict() -> None:
    queue = KeyQueue(size=4, dim=3)
    queue.enqueue(torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]]))
    torch.testing.assert_close(queue.keys[:2], torch.tensor([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]]))
    state = queue.state_dict()
    restored = KeyQueue(size=4, dim=3, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored.keys, queue.keys) and int(restored.ptr) == 2


def test_split_bn_keys_come_back_in_order() -> None:
    linear = nn.Linear(4, 3)  # no BN: any grouping must give exactly the direct keys, in order
    x = torch.randn(12, 4)
    keys = encode_keys_without_bn_leak(linear, x, splits=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(keys, linear(x))


def test_split_bn_uses_group_statistics() -> None:
    bn = nn.BatchNorm1d(2).train()
    x = torch.arange(16, dtype=torch.float32).view(8, 2)  # sorted rows: groups have different means
    keys = encode_keys_without_bn_leak(bn, x, splits=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(keys, nn.BatchNorm1d(2).train()(x), atol=1e-3)
    # each half of the permuted batch is normalised on its own: every column sums to ~0 per group
    assert keys.abs().sum() > 0 and math.isfinite(keys.sum().item())
    with pytest.raises(ValueError, match="bn_splits"):
        encode_keys_without_bn_leak(bn, x, splits=3)
