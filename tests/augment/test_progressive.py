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
    assert s.describe(14) == "epochs 40 px 1-6, 48 px 7-8, 56 px 9-10, 64 px 11-14"


def test_the_ramp_is_placed_by_fractions_of_the_epochs() -> None:
    cfg = _cfg("augment.progressive_min=40", "augment.progressive_ramp=[0.5,0.85]")
    assert resolution_schedule(cfg, 64, 20) == ResolutionSchedule(40, 64, 10, 17, 32)
    for epochs in (1, 2, 3, 10):  # however short the run or late the ramp, the last epoch is at the full side
        for ramp in ("[0.5,0.85]", "[1,1]", "[0.95,1]", "[0,0]"):
            late = resolution_schedule(
                _cfg("augment.progressive_min=40", f"augment.progressive_ramp={ramp}"), 64, epochs
            )
            assert late is not None and late.side(epochs - 1) == 64, (epochs, ramp)
    assert [resolution_schedule(cfg, 64, 3).side(e) for e in range(3)] == [40, 40, 64]  # type: ignore[union-attr]
    ends = resolution_schedule(_cfg("augment.progressive_min=40", "augment.progressive_ramp=[0,1]"), 64, 10)
    assert ends is not None and (ends.side(0), ends.side(9)) == (40, 64)
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


def test_the_blur_kernel_follows_the_side_and_the_choice_to_blur_the_full_side() -> None:
    views = build_views(_cfg("augment.crop_size=64", "augment.blur_min_size=33"), 96, MEAN, STD, seed=0)
    views.set_side(24)  # under blur_min_size, but the run's views are 64 px: still blurred, a smaller kernel
    assert all(v.spec.blur_p == 0.5 and v.spec.blur_kernel == 3 for v in views.views)
    views.set_side(40)
    assert all(v.spec.blur_p == 0.5 and v.spec.blur_kernel == 5 for v in views.views)
    small = build_views(_cfg("augment.crop_size=32", "augment.blur_min_size=33"), 48, MEAN, STD, seed=0)
    small.set_side(16)  # CIFAR-sized views are never blurred (SimCLR)
    assert all(v.spec.blur_p == 0 for v in small.views)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs it on a GPU)")
def test_kornia_views_keep_drawing_on_the_device_after_a_change_of_side() -> None:
    views = build_views(_cfg("augment.backend=kornia"), 32, MEAN, STD, device="cuda")
    views.set_side(16)
    assert all(op.device.type == "cuda" for v in views.views for op in v.ops)  # where each Kornia module draws
    out = views(_batch(size=32).cuda())
    assert all(v.device.type == "cuda" and v.shape[-1] == 16 for v in out)
