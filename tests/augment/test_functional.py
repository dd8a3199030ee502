"""The batched ops against Kornia's own functions and against direct slicing / interpolation."""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia.augmentation as K
import kornia.color
import kornia.enhance as KE
import kornia.filters as KF
import pytest
import torch
import torch.nn.functional as F

from twinview.augment import functional as AF

ATOL = 2e-6  # float32 rounding; the ops compute the same formulas as Kornia


def _images(n: int = 6, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, h, w), generator=g)
    if n < 3:
        return x
    x[0, :, :4] = 0.5  # gray pixels (zero chroma)
    x[1, 0], x[1, 1] = x[1, 2], x[1, 2]  # a fully gray image
    x[2, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0])  # ties for the max channel
    x[2, :, 0, 1] = torch.tensor([0.0, 1.0, 1.0])
    x[2, :, 0, 2] = torch.tensor([1.0, 0.0, 1.0])
    return x


def _factors(n: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * (high - low) + low


@pytest.mark.parametrize(
    ("ours", "kornia_fn"),
    [
        (AF.adjust_brightness_, KE.adjust_brightness_accumulative),
        (AF.adjust_contrast_, KE.adjust_contrast_with_mean_subtraction),
        (AF.adjust_saturation_, KE.adjust_saturation_with_gray_subtraction),
    ],
)
def test_linear_colour_steps_equal_kornia(
    ours: Callable[..., torch.Tensor], kornia_fn: Callable[..., torch.Tensor]
) -> None:
    x = _images()
    f = _factors(len(x), 0.0, 2.0)
    expected = kornia_fn(x, f).clamp(0, 1)
    got = ours(x.clone(), f)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.3, -0.05, 0.0, 0.11, 0.25, 0.5])
def test_hue_shift_equals_kornia_hsv_round_trip(shift: float) -> None:
    x = _images()
    turns = torch.full((len(x),), shift)
    expected = KE.adjust_hue(x, turns * 2 * math.pi)
    torch.testing.assert_close(AF.adjust_hue_(x.clone(), turns), expected, atol=1e-5, rtol=0)


def test_hue_shift_of_pure_colours_by_a_third_turn_permutes_channels() -> None:
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    out = AF.adjust_hue_(red.clone(), torch.tensor([1 / 3]))  # red (0 deg) -> green (120 deg)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_colour_jitter_equals_kornia_color_jitter_in_the_same_order(order: tuple[int, ...]) -> None:
    x = _images(8)
    n = len(x)
    factors = torch.stack(
        [_factors(n, 0.2, 1.8, 1), _factors(n, 0.2, 1.8, 2), _factors(n, 0.2, 1.8, 3), _factors(n, -0.2, 0.2, 4)], 1
    )
    jitter = K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=1.0, order=order)
    params = {
        "brightness_factor": factors[:, 0],
        "contrast_factor": factors[:, 1],
        "saturation_factor": factors[:, 2],
        "hue_factor": factors[:, 3],
        "order": torch.tensor(order),
        "batch_prob": torch.ones(n, dtype=torch.bool),
    }
    expected = jitter(x, params=jitter.forward_parameters(x.shape) | params)
    got = AF.color_jitter_(x.clone(), factors, list(order))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_grayscale_equals_kornia_and_only_where_asked() -> None:
    x = _images()
    apply = torch.tensor([True, False, True, False, False, True])
    out = AF.random_grayscale_(x.clone(), apply)
    gray = kornia.color.rgb_to_grayscale(x).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out[apply], gray[apply], atol=ATOL, rtol=0)
    assert torch.equal(out[~apply], x[~apply])


@pytest.mark.parametrize("size", [3, 7, 11])
def test_gaussian_blur_equals_kornia_with_reflect_border(size: int) -> None:
    x = _images()
    sigma = _factors(len(x), 0.1, 2.0)
    expected = KF.gaussian_blur2d(x, (size, size), torch.stack([sigma, sigma], 1), border_type="reflect")
    torch.testing.assert_close(AF.gaussian_blur(x, sigma, size), expected, atol=ATOL, rtol=0)


def test_gaussian_blur_with_zero_sigma_is_the_identity() -> None:
    x = _images()
    torch.testing.assert_close(AF.gaussian_blur(x, torch.zeros(len(x)), 9), x, atol=0, rtol=0)


def test_solarize_inverts_at_or_above_the_threshold_only_where_asked() -> None:
    x = _images()
    apply = torch.tensor([True, True, False, False, True, False])
    out = AF.solarize_(x.clone(), apply, 0.5)
    expected = KE.solarize(x, 0.5)
    torch.testing.assert_close(out[apply], expected[apply], atol=ATOL, rtol=0)
    assert torch.equal(out[~apply], x[~apply])


def test_resized_crop_of_the_whole_image_equals_bilinear_interpolation() -> None:
    x = _images(3, 20, 24)
    boxes = torch.tensor([[0.0, 0.0, 24.0, 20.0]]).repeat(3, 1)
    for size in [(10, 12), (20, 24), (33, 40)]:  # down, same, up
        got = AF.resized_crop(x, boxes, torch.zeros(3, dtype=torch.bool), size)
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_resized_crop_at_native_size_is_the_slice_and_flip_mirrors_it() -> None:
    x = _images(2, 20, 24)
    boxes = torch.tensor([[3.0, 5.0, 8.0, 8.0], [10.0, 0.0, 8.0, 8.0]])
    flips = torch.tensor([False, True])
    got = AF.resized_crop(x, boxes, flips, (8, 8))
    torch.testing.assert_close(got[0], x[0, :, 5:13, 3:11], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], x[1, :, 0:8, 10:18].flip(-1), atol=1e-5, rtol=0)


def test_resized_crop_upscale_matches_interpolating_the_slice_inside_the_box() -> None:
    x = _images(1, 20, 24)
    got = AF.resized_crop(x, torch.tensor([[4.0, 2.0, 10.0, 10.0]]), torch.zeros(1, dtype=torch.bool), (20, 20))
    expected = F.interpolate(x[:, :, 2:12, 4:14], size=(20, 20), mode="bilinear", align_corners=False)
    # The outermost output pixels sample half a source pixel outside the box (the crop is a window
    # of the image, not a separate image); everywhere else the two agree.
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
