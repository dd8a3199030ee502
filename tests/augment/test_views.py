"""View pipelines: shapes, dtype, range, independence, seeding, recipes' statistics, multi-crop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from twinview.augment import views as V
from twinview.augment.config import RECIPES
from twinview.augment.sampling import ViewRNG
from twinview.augment.views import KorniaViewPipeline, ViewPipeline, ViewSpec, blur_kernel_size, build_views, view_specs
from twinview.pretrain.config import AugmentConfig, ConfigError, load_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # normalisation that leaves views in [0, 1]
# A view that changes nothing: whole-image crop at native size, every random op off.
IDENTITY = ViewSpec(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def _cfg(*overrides: str) -> AugmentConfig:
    return load_config(None, ["data.path=unused", *overrides]).augment


def _batch(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (uint8), so crops and blur visibly change them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 4, 4), generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").mul(255).round().byte()


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("size", [32, 48])
def test_views_have_the_right_shape_dtype_device_and_range(recipe: str, size: int) -> None:
    x = _batch(8, size)
    views = build_views(_cfg(f"augment.recipe={recipe}"), size, MEAN, STD, seed=0)(x)
    assert len(views) == 2
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min()
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max()
    for v in views:
        assert v.shape == (8, 3, size, size) and v.dtype == torch.float32 and v.device == x.device
        assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    assert (views[0] - views[1]).abs().flatten(1).amax(1).min() > 1e-3  # every sample's two views differ
    plain = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert ((views[0] - plain).abs().flatten(1).mean(1) > 1e-3).all()  # and differ from the input


def test_output_dtype_and_float_input() -> None:
    x = _batch(4)
    (a, _) = build_views(_cfg(), 32, MEAN, STD, seed=0, dtype=torch.bfloat16)(x)
    assert a.dtype == torch.bfloat16
    (b, _) = build_views(_cfg(), 32, MEAN, STD, seed=0)(x.float() / 255)  # [0, 1] float input
    torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.02)


def test_identical_images_in_a_batch_get_different_views() -> None:
    x = _batch(1).repeat(8, 1, 1, 1)
    (view, _) = build_views(_cfg(), 32, MEAN, STD, seed=0)(x)
    flat = view.flatten(1)
    off_diagonal = torch.cdist(flat, flat)[~torch.eye(8, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()


def test_seeded_views_are_reproducible_and_seeds_differ() -> None:
    x = _batch()
    first = build_views(_cfg("augment.recipe=byol"), 32, MEAN, STD, seed=7)(x)
    second = build_views(_cfg("augment.recipe=byol"), 32, MEAN, STD, seed=7)(x)
    other = build_views(_cfg("augment.recipe=byol"), 32, MEAN, STD, seed=8)(x)
    for a, b, c in zip(first, second, other, strict=True):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_rng_state_round_trip_replays_the_same_views() -> None:
    x = _batch()
    views = build_views(_cfg(), 32, MEAN, STD, seed=3)
    views(x)
    state = views.rng.state_dict()
    expected = views(x)
    views(x)  # moves the generator on
    views.rng.load_state_dict(state)
    for a, b in zip(views(x), expected, strict=True):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_cpu_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _batch(24, 48)
    cfg = _cfg("augment.recipe=byol", "augment.blur_min_size=0", "augment.solarize_p=[0.5,0.5]")
    whole = build_views(cfg, 48, MEAN, STD, seed=1)(x)
    monkeypatch.setattr(V, "CPU_CHUNK_BYTES", 3 * 48 * 48 * 4 * 5)  # chunks of 5 samples
    chunked = build_views(cfg, 48, MEAN, STD, seed=1)(x)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_identity_view_returns_the_normalised_input() -> None:
    x = _batch(4, 16)
    out = ViewPipeline(IDENTITY, MEAN, STD)(x, ViewRNG(0))
    plain = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def _fraction_changed(spec: ViewSpec, n: int = 4000, seed: int = 0) -> tuple[float, torch.Tensor, torch.Tensor]:
    x = _batch(n, spec.size, seed)
    out = ViewPipeline(spec, *UNIT)(x, ViewRNG(seed))
    changed = (out - x.float() / 255).abs().flatten(1).amax(1) > 1e-4
    return changed.float().mean().item(), out, x


# Binomial(4000, p): sd <= 0.008, so +-0.035 is > 4 sd.
@pytest.mark.parametrize(
    ("field", "p"),
    [("flip_p", 0.5), ("jitter_p", 0.8), ("grayscale_p", 0.2), ("blur_p", 0.5), ("blur_p", 0.1), ("solarize_p", 0.2)],
)
def test_each_op_applies_to_a_fraction_near_its_probability(field: str, p: float) -> None:
    spec = dataclasses.replace(IDENTITY, **{field: p}, blur_kernel=5, blur_sigma=(1.0, 2.0))  # visible blur
    frac, _, _ = _fraction_changed(spec)
    assert abs(frac - p) < 0.035


def test_grayscale_views_have_equal_channels() -> None:
    _, out, _ = _fraction_changed(dataclasses.replace(IDENTITY, grayscale_p=0.2))
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert abs(gray.float().mean().item() - 0.2) < 0.035


def test_crop_areas_follow_the_scale_range() -> None:
    """Full-range crops of a ramp image: mean crop area near that of U(0.08, 1) clipped by the fit rule."""
    from twinview.augment.sampling import crop_boxes

    boxes = crop_boxes(
        20000, 64, 64, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 64).all() and (y0 + h <= 64).all()
    area = w * h / 64**2
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.7  # integer rounding of sides at 64 px
    assert 0.45 < area.mean().item() < 0.56  # U(0.08, 1) has mean 0.54; crops that do not fit retry


def test_fast_views_match_kornia_views_in_distribution() -> None:
    """Same spec, Kornia's modules vs twinview's ops: per-view mean and spread agree over many samples."""
    spec = view_specs(_cfg("augment.jitter_strength=0.5"), 32)[0]
    x = _batch(3000, 32)
    fast = ViewPipeline(spec, *UNIT)(x, ViewRNG(0))
    torch.manual_seed(0)
    kornia = KorniaViewPipeline(spec, *UNIT)(x)
    for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(2, 3)).mean(1)):
        a, b = stat(fast), stat(kornia)
        assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02


def test_asymmetric_recipes_blur_view_one_always() -> None:
    specs = view_specs(_cfg("augment.recipe=byol"), 96)
    assert [s.blur_p for s in specs] == [1.0, 0.1] and [s.solarize_p for s in specs] == [0.0, 0.2]
    assert specs[0].blur_kernel == blur_kernel_size(96, 0.1) == 11


def test_blur_is_off_for_small_images() -> None:
    assert all(s.blur_p == 0 for s in view_specs(_cfg(), 32))
    assert all(s.blur_p == 0.5 for s in view_specs(_cfg(), 96))
    assert blur_kernel_size(224, 0.1) == 23 and blur_kernel_size(8, 0.1) == 3


def test_multi_crop_adds_local_views_at_their_own_resolution() -> None:
    cfg = _cfg("augment.local_crops=4", "augment.crop_size=64")
    views = build_views(cfg, 80, MEAN, STD, seed=0)(_batch(3, 80))
    assert [tuple(v.shape) for v in views] == [(3, 3, 64, 64)] * 2 + [(3, 3, 27, 27)] * 4  # 64 * 96 / 224
    cfg = _cfg("augment.local_crops=2", "augment.local_crop_size=16")
    views = build_views(cfg, 32, MEAN, STD, seed=0)(_batch(3))
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]


def test_recipe_values_fill_unset_keys_and_overrides_win() -> None:
    cfg = _cfg("augment.recipe=moco_v2")
    assert cfg.crop_scale == (0.2, 1.0) and cfg.brightness == 0.4 and cfg.hue == 0.1
    cfg = _cfg("augment.recipe=moco_v2", "augment.brightness=0.1", "augment.solarize_p=[0.0,0.5]")
    assert cfg.brightness == 0.1 and cfg.contrast == 0.4 and cfg.solarize_p == (0.0, 0.5)


def test_unknown_recipe_and_wrong_per_view_type_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"augment.recipe.*simclr, moco_v2, byol, moco_v3"):
        _cfg("augment.recipe=swav")
    with pytest.raises(ConfigError, match=r"augment.blur_p"):
        _cfg("augment.blur_p=0.5")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs it on a GPU)")
def test_cuda_views_make_no_host_synchronisation() -> None:
    x = _batch(8, 64).cuda()
    cfg = _cfg("augment.recipe=byol", "augment.local_crops=2")
    views = build_views(cfg, 64, MEAN, STD, seed=0, device="cuda", dtype=torch.bfloat16)
    views(x)  # warm-up (kernel caches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = views(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(v.device.type == "cuda" and v.dtype == torch.bfloat16 for v in out)
    cpu = build_views(cfg, 64, MEAN, STD, seed=0)(x.cpu())
    assert cpu[0].shape == out[0].shape
