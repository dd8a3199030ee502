"""Batched image ops with per-sample parameters, for float ``(N, 3, H, W)`` images in ``[0, 1]``.

Why these exist next to Kornia (measured in bench/augment.py, docs/BENCHMARKS.md):

* Kornia's ``RandomResizedCrop`` crops and resizes each sample with its own ``interpolate`` call, a
  Python loop over the batch. :func:`resized_crop` maps every output pixel into its sample's box with
  one batched ``affine_grid`` + ``grid_sample``, and folds the horizontal flip into the same grid.
* Kornia's ``ColorJitter`` goes through a full RGB -> HSV -> RGB round trip for the hue step and
  allocates a new tensor at every step; on a CPU it is the slowest op of the SimCLR pipeline.
  :func:`color_jitter_` keeps Kornia's (torchvision's) semantics, works
  in place, and shifts the hue with the closed-form HSV-to-RGB formula without building HSV planes.
  Tests check each step against Kornia's own function.

The elementwise ops modify their input in place; callers pass a scratch tensor they own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601 luma, as rgb_to_grayscale in Kornia and torchvision.
LUMA = (0.299, 0.587, 0.114)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crops a box from each image, resizes it bilinearly to ``size`` and optionally mirrors it.

    Pixel centres are aligned as in ``interpolate(..., align_corners=False)``: output column ``j``
    samples source column ``x0 + (j + 0.5) * w / W_out - 0.5``. Like Kornia's crop, there is no
    antialiasing filter when a box is larger than the output.

    Args:
        images: ``(N, C, H, W)`` float images.
        boxes: ``(N, 4)`` ``[x0, y0, w, h]`` in source pixels.
        flips: ``(N,)`` bool, True mirrors that sample horizontally.
        size: Output ``(height, width)``.

    Returns:
        ``(N, C, height, width)`` crops, same dtype as ``images``.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.to(images.dtype).unbind(1)  # (N,) each
    sign = 1.0 - 2.0 * flips.to(images.dtype)  # -1 mirrors: the grid's x runs right to left
    # grid_sample coordinates (align_corners=False) are affine in the output pixel centres u, v in
    # (-1, 1); built directly rather than through affine_grid's (N, H*W, 3) @ (N, 3, 2) matmul.
    u = (torch.arange(size[1], dtype=images.dtype, device=images.device) * 2 + 1) / size[1] - 1
    v = (torch.arange(size[0], dtype=images.dtype, device=images.device) * 2 + 1) / size[0] - 1
    gx = (sign * w / width)[:, None] * u + ((2 * x0 + w) / width - 1)[:, None]  # (N, W_out)
    gy = (h / height)[:, None] * v + ((2 * y0 + h) / height - 1)[:, None]  # (N, H_out)
    grid = torch.stack(
        [gx[:, None, :].expand(n, size[0], size[1]), gy[:, :, None].expand(n, size[0], size[1])], dim=-1
    )  # (N, H_out, W_out, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` luma."""
    r, g, b = images.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def adjust_brightness_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * f`` clipped to [0, 1], in place; ``factor`` is ``(N,)`` (Kornia's accumulative brightness)."""
    return images.mul_(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends each image with the mean of its luma: ``f * x + (1 - f) * mean``, clipped, in place."""
    means = grayscale(images.mean(dim=(2, 3), keepdim=True))  # (N, 1, 1, 1): mean luma = luma of channel means
    torch.lerp(means, images, factor.view(-1, 1, 1, 1), out=images)
    return images.clamp_(0.0, 1.0)


def adjust_saturation_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends each image with its luma: ``f * x + (1 - f) * gray``, clipped, in place."""
    torch.lerp(grayscale(images), images, factor.view(-1, 1, 1, 1), out=images)
    return images.clamp_(0.0, 1.0)


def adjust_hue_(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the HSV hue of each image by ``shift`` turns (``(N,)``, in [-0.5, 0.5]), in place.

    Value (max) and chroma (max - min) are kept; the new RGB follows from the HSV-to-RGB formula
    ``c_n = V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 H) mod 6`` and n = 5, 3, 1 for
    R, G, B, so no HSV planes are materialised. The channel holding the max is picked with
    arithmetic masks rather than ``torch.where``, which is much slower per element on a CPU
    (docs/BENCHMARKS.md).
    Equal to Kornia's ``adjust_hue`` up to float rounding.
    """
    r, g, b = images.unbind(1)  # (N, H, W) views
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    is_r = torch.sign(r - value).add_(1.0)  # 1 where R holds the max, else 0
    is_g = torch.sign(g - value).add_(1.0).mul_(1.0 - is_r)  # G holds it and R does not (R wins ties)
    # hue in sextants: (g - b) / C, 2 + (b - r) / C or 4 + (r - g) / C, from whichever channel is max
    hue6 = (g - b).mul_(is_r)
    hue6.addcmul_(b - r + 2.0 * chroma, is_g)
    hue6.addcmul_(r - g + 4.0 * chroma, 1.0 - is_r - is_g)
    hue6.mul_(chroma.clamp_min(1e-12).reciprocal_()).add_(shift.view(-1, 1, 1), alpha=6.0)
    for channel, n in ((r, 5.0), (g, 3.0), (b, 1.0)):
        k = hue6 + n
        k.sub_(torch.floor(k / 6.0), alpha=6.0)  # mod 6 (faster than torch.remainder here)
        torch.minimum(k, 4.0 - k, out=k).clamp_(0.0, 1.0)
        torch.sub(value, k.mul_(chroma), out=channel)
    return images


COLOR_STEPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)


def color_jitter_(images: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Colour jitter as Kornia's ``ColorJitter``: the four steps in ``order``, in place.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        factors: ``(N, 4)`` brightness, contrast, saturation factors and hue shift in turns
            (identity is ``(1, 1, 1, 0)``; see :func:`twinview.augment.sampling.jitter_factors`).
        order: A permutation of ``0..3`` (brightness, contrast, saturation, hue).

    Returns:
        ``images``, jittered.
    """
    for step in order:
        COLOR_STEPS[step](images, factors[:, step])
    return images


def random_grayscale_(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Replaces the samples where ``apply`` (``(N,)`` bool) is set by their luma in all channels."""
    mask = apply.to(images.dtype).view(-1, 1, 1, 1)
    return images.addcmul_(grayscale(images) - images, mask)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``(N,)`` standard deviations -> ``(N, size)`` normalised 1-D Gaussian kernels; sigma 0 is a delta."""
    taps = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    logits = -(taps**2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2)
    return torch.softmax(logits, dim=1)  # exp(-t^2 / 2s^2), normalised to sum 1


BLUR_BLOCK = 16  # output pixels per band of the blur matmul (16 beat 32 and 64 in bench/augment.py)


def _toeplitz_band(kernels: torch.Tensor, block: int) -> torch.Tensor:
    """``(N, size)`` kernels -> ``(N, block, block + size - 1)`` banded matrices: row i holds the
    kernel at columns ``i .. i + size - 1``, so a band of ``block + size - 1`` padded inputs maps to
    ``block`` outputs."""
    _, size = kernels.shape
    rows = torch.arange(block, device=kernels.device)[:, None]
    cols = torch.arange(block + size - 1, device=kernels.device)[None, :]
    tap = cols - rows  # (block, L)
    inside = (tap >= 0) & (tap < size)
    return kernels[:, tap.clamp(0, size - 1)] * inside


def _blur_last_axis(padded: torch.Tensor, kernels: torch.Tensor, length: int) -> torch.Tensor:
    """1-D convolution along the last axis of an already padded ``(N, ...)`` tensor, per-sample kernels."""
    n, size = kernels.shape
    window = BLUR_BLOCK + size - 1
    bands = -(-length // BLUR_BLOCK)
    extra = bands * BLUR_BLOCK + size - 1 - padded.shape[-1]
    if extra:
        padded = F.pad(padded, (0, extra))
    windows = padded.unfold(-1, window, BLUR_BLOCK)  # (N, ..., bands, window)
    band = _toeplitz_band(kernels, BLUR_BLOCK).to(padded.dtype)  # (N, block, window)
    out = torch.matmul(windows.reshape(n, -1, window), band.transpose(1, 2))  # (N, rest * bands, block)
    return out.view(*padded.shape[:-1], bands * BLUR_BLOCK)[..., :length]


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding (as torchvision).

    Each axis is one batched matmul of overlapping bands of the padded image with a small banded
    (Toeplitz) kernel matrix: on a CPU this is faster than a depthwise ``conv2d`` with
    ``groups = N * C``, oneDNN's path for per-sample kernels (docs/BENCHMARKS.md). A sample with ``sigma == 0`` is
    returned unchanged (its kernel is a delta).

    Args:
        images: ``(N, C, H, W)``.
        sigma: ``(N,)`` standard deviations in pixels.
        size: Odd kernel side.

    Returns:
        The blurred ``(N, C, H, W)`` batch (a new tensor).
    """
    height, width = images.shape[-2:]
    pad = size // 2
    kernels = gaussian_kernels(sigma, size)  # (N, size)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (N, C, H + 2p, W + 2p)
    rows = _blur_last_axis(padded, kernels, width)  # (N, C, H + 2p, W)
    return _blur_last_axis(rows.transpose(2, 3), kernels, height).transpose(2, 3)


def solarize_(images: torch.Tensor, apply: torch.Tensor, threshold: float) -> torch.Tensor:
    """Inverts pixels ``>= threshold`` in the samples where ``apply`` (``(N,)`` bool) is set, in place.

    ``x + step(x - t) * (1 - 2x)``: arithmetic instead of a boolean ``where`` (faster on the CPU).
    """
    step = torch.heaviside(images - threshold, images.new_ones(()))  # 1 at or above the threshold
    step.mul_(apply.to(images.dtype).view(-1, 1, 1, 1))
    return images.addcmul_(step, 1.0 - 2.0 * images)
