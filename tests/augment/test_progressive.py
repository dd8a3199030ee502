"""Progressive resolution: the schedule's sides per epoch, and views that change side in place."""

from __future__ import annotations

import pytest
import torch

from twinview.augment.progressive import ResolutionSchedule, resolution_schedule
from twinview.augment.views import build_views
from twinview.pretrain.config import AugmentConfig, load_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cfg(*overrides: str) -> AugmentConfig:
    return load_config(None, ["data.path=unused", *overrides]).augment


def _batch(n: int = 4, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_the_side_is_low_then_a_rounded_linear_ramp_then_full() -> None:
    s = ResolutionSchedule(low=40, high=64, start=4, end=10, multiple=8)
    sides = [s.side(e) for e in range(14)]
    # linear from 40 at epoch 4 to 64 at epoch 10 (40 + 4 per epoch), rounded down to multiples of 8
    assert sides == [40] * 5 + [40, 48, 48, 56, 56] + [64] * 4
    assert s.describe() == "40 px to epoch 5, ramp to 64 px at epoch 11"


def test_the_ramp_is_placed_by_fractions_of_the_epochs() -> None:
    cfg = _cfg("augment.progressive_min=40", "augment.progressive_ramp=[0.5,0.85]")
    assert resolution_schedule(cfg, 64, 20) == ResolutionSchedule(40, 64, 10, 17, 8)
    assert resolution_schedule(cfg, 64, 1) == ResolutionSchedule(40, 64, 0, 0, 8)  # one epoch: at full side
    assert resolution_schedule(cfg, 64, 1).side(0) == 40  # type: ignore[union-attr]
    ends = resolution_schedule(_cfg("augment.progressive_min=40", "augment.progressive_ramp=[0,1]"), 64, 10)
    assert ends is not None and (ends.side(0), ends.side(9)) == (40, 64)  # the last epoch is at the full side
    assert resolution_schedule(_cfg(), 64, 20) is None  # off by default
    assert resolution_schedule(cfg, 40, 20) is None  # nothing to grow to


@pytest.mark.parametrize("backend", ["fast", "kornia"])
def test_views_change_side_and_local_views_keep_their_proportion(backend: str) -> None:
    cfg = _cfg(f"augment.backend={backend}", "augment.crop_size=32", "augment.local_crops=2")
    views = build_views(cfg, 48, MEAN, STD, seed=0)
    assert [v.shape[-1] for v in views(_batch())] == [32, 32, 14, 14]  # 32 * 96 / 224
    views.set_side(16)
    assert views.side == 16
    assert [v.shape[-1] for v in views(_batch())] == [16, 16, 7, 7]
    views.set_side(32)
    assert [v.shape[-1] for v in views(_batch())] == [32, 32, 14, 14]


def test_back_at_full_side_the_views_are_those_of_views_built_there() -> None:
    """Changing side swaps the specs only: the same random state gives the same full-size views."""
    cfg = _cfg("augment.crop_size=32", "augment.recipe=byol")
    moved = build_views(cfg, 48, MEAN, STD, seed=3)
    moved.set_side(16)
    moved.set_side(32)
    fresh = build_views(cfg, 48, MEAN, STD, seed=3)
    for a, b in zip(moved(_batch()), fresh(_batch()), strict=True):
        assert torch.equal(a, b)


def test_blur_follows_the_side() -> None:
    cfg = _cfg("augment.crop_size=64", "augment.blur_min_size=33")
    views = build_views(cfg, 96, MEAN, STD, seed=0)
    views.set_side(24)  # under blur_min_size: SimCLR's rule for small views
    assert all(v.spec.blur_p == 0 for v in views.views)
    views.set_side(40)
    assert all(v.spec.blur_p == 0.5 and v.spec.blur_kernel == 5 for v in views.views)
