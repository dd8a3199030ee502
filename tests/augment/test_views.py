"""SimCLR views: shapes, dtype, device, value range, independence and the recipe's statistics."""

from __future__ import annotations

import pytest
import torch

from twinview.augment.views import SimCLRView, blur_kernel_size, build_views
from twinview.pretrain.config import AugmentConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_two_views_have_the_right_shape_dtype_device_and_range() -> None:
    views = build_views(AugmentConfig(), 32, MEAN, STD)
    x = _batch()
    a, b = views(x)
    for v in (a, b):
        assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32 and v.device == x.device
        # Normalised values of [0, 1] images lie in [(0 - mean) / std, (1 - mean) / std].
        lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min()
        hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max()
        assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    assert not torch.allclose(a, b)


def test_crop_size_and_number_of_views() -> None:
    cfg = AugmentConfig(crop_size=24)
    views = build_views(cfg, 32, MEAN, STD, num_views=3)(_batch(4))
    assert len(views) == 3 and all(v.shape == (4, 3, 24, 24) for v in views)


def test_views_differ_from_the_normalised_input() -> None:
    x = _batch(8)
    view = SimCLRView(AugmentConfig(), 32, MEAN, STD)(x)
    plain = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    per_sample = (view - plain).abs().flatten(1).mean(1)
    assert (per_sample > 1e-3).all()


def test_identical_images_in_a_batch_get_different_views() -> None:
    x = _batch(1).repeat(8, 1, 1, 1)
    (view,) = build_views(AugmentConfig(), 32, MEAN, STD, num_views=1)(x)
    flat = view.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(8, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()


def test_seeded_views_are_reproducible() -> None:
    views = build_views(AugmentConfig(), 32, MEAN, STD)
    torch.manual_seed(123)
    first = views(_batch())
    torch.manual_seed(123)
    second = views(_batch())
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_grayscale_fraction_is_near_p() -> None:
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.2)
    view = SimCLRView(cfg, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    x = _batch(4000, 16)
    out = view(x)
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    # Binomial(4000, 0.2): sd = 0.0063, so +-0.03 is ~5 sd.
    assert abs(gray.float().mean().item() - 0.2) < 0.03


def test_identity_recipe_returns_the_normalised_input() -> None:
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    x = _batch(4)
    out = SimCLRView(cfg, 32, MEAN, STD)(x)
    plain = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_blur_is_off_for_small_images_and_sized_to_the_image() -> None:
    small = SimCLRView(AugmentConfig(blur_p=0.5), 32, MEAN, STD)
    assert not any("Blur" in type(m).__name__ for m in small.ops)
    large = SimCLRView(AugmentConfig(blur_p=0.5), 96, MEAN, STD)
    assert any("Blur" in type(m).__name__ for m in large.ops)
    assert blur_kernel_size(224, 0.1) == 23 and blur_kernel_size(96, 0.1) == 11 and blur_kernel_size(8, 0.1) == 3


def test_unknown_recipe_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown augment.recipe"):
        build_views(AugmentConfig(recipe="byol"), 32, MEAN, STD)
