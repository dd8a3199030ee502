"""Contrastive views made on the training device, batched, with per-sample random parameters.

The data loader hands over uint8 ``(B, 3, H, W)`` batches (the CPU only decodes and resizes).
Everything here runs on the batch's device with no per-sample Python loop and no host sync:

* :class:`ViewPipeline` is one view: random resized crop + flip, colour jitter, grayscale, Gaussian
  blur, solarisation, normalisation with the backbone's mean/std, cast to the output dtype. Every
  sample draws its own parameters on every call. The ops are the batched ones in
  :mod:`twinview.augment.functional` (faster than Kornia's where Kornia is slow; tested equal to
  Kornia's functions). :class:`KorniaViewPipeline` builds the same view from Kornia's modules, as
  the reference and for comparison (``augment.backend=kornia``).
* :class:`MultiView` holds one pipeline per view (two global views, optionally asymmetric, plus
  multi-crop local views at another resolution) and returns the list of view batches.

Seeding: pass a :class:`twinview.augment.sampling.ViewRNG`; the same seed and batch give the same
views. Without one, parameters come from torch's global generator (``torch.manual_seed``), which
is also what the Kornia backend always uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

import kornia.augmentation as K
import torch
from torch import nn

from twinview.augment import functional as AF
from twinview.augment import sampling
from twinview.augment.config import AugmentConfig
from twinview.augment.sampling import ViewRNG

_T = TypeVar("_T")
# On a CPU, the pipeline works through the batch in chunks of about this many bytes of float32
# views, so the ~20 elementwise passes of a view hit the cache instead of memory (bench/augment.py).
CPU_CHUNK_BYTES = 2 << 20


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Maps uint8 images to float32 in [0, 1]; float input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


class Normalize(nn.Module):
    """uint8 or [0, 1] float images -> ``(x - mean) / std`` with the backbone's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Stores the per-channel statistics as buffers (they follow the module's device).

        Args:
            mean: Per-channel mean in [0, 1] units (from timm's data config).
            std: Per-channel standard deviation in [0, 1] units.
        """
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalises a ``(B, C, H, W)`` batch; returns float32."""
        return (to_unit_float(images) - self.mean) / self.std


def blur_kernel_size(side: int, fraction: float) -> int:
    """Odd Gaussian kernel side of about ``fraction`` of the image side (at least 3)."""
    k = max(3, math.ceil(side * fraction))
    return k if k % 2 == 1 else k + 1


@dataclass(frozen=True)
class ViewSpec:
    """Everything that defines one view; built from the augment config by :func:`view_specs`.

    Attributes:
        size: Output side in pixels.
        crop_scale: Area range of the random resized crop (fraction of the source image).
        crop_ratio: Aspect-ratio range of the crop.
        flip_p: Probability of a horizontal flip.
        brightness: Brightness factor range ``[1 - b, 1 + b]``.
        contrast: Contrast factor range.
        saturation: Saturation factor range.
        hue: Hue shift range ``[-h, h]`` in turns (at most 0.5).
        jitter_p: Probability of colour jitter.
        grayscale_p: Probability of grayscale.
        blur_p: Probability of Gaussian blur (0 disables it).
        blur_kernel: Odd blur kernel side.
        blur_sigma: Range of the blur's standard deviation, in pixels.
        solarize_p: Probability of solarisation.
        solarize_threshold: Pixels at or above it (in [0, 1]) are inverted.
    """

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5


def _filled(value: _T | None, key: str) -> _T:
    """A recipe key's value; unset means the recipe was never applied."""
    if value is None:
        raise ValueError(f"augment.{key} is unset; resolve the recipe first (load_config does).")
    return value


def view_specs(cfg: AugmentConfig, image_size: int, side: int = 0) -> list[ViewSpec]:
    """The views a resolved augment config describes: two global views, then the local ones.

    Blur is left off for views whose full side is under ``cfg.blur_min_size`` (SimCLR does not blur
    CIFAR); under progressive resolution the kernel follows the side, the choice to blur does not.

    Args:
        cfg: The augment section, with the recipe's values filled in (``load_config`` does that).
        image_size: Side of the loader's images; the global view side when ``cfg.crop_size`` is 0.
        side: The global views' side this epoch under progressive resolution (0: the full side);
            the local views keep their proportion to it.
    """
    s = cfg.jitter_strength
    full = cfg.crop_size or image_size
    size = side or full
    crop_scale = _filled(cfg.crop_scale, "crop_scale")
    blur_p, solarize_p = _filled(cfg.blur_p, "blur_p"), _filled(cfg.solarize_p, "solarize_p")

    def spec(side: int, full_side: int, scale: tuple[float, float], blur: float, solarize: float) -> ViewSpec:
        return ViewSpec(
            side,
            (scale[0], scale[1]),
            crop_ratio=(cfg.crop_ratio[0], cfg.crop_ratio[1]),
            flip_p=cfg.flip_p,
            brightness=_filled(cfg.brightness, "brightness") * s,
            contrast=_filled(cfg.contrast, "contrast") * s,
            saturation=_filled(cfg.saturation, "saturation") * s,
            hue=min(0.5, _filled(cfg.hue, "hue") * s),
            jitter_p=_filled(cfg.jitter_p, "jitter_p"),
            grayscale_p=_filled(cfg.grayscale_p, "grayscale_p"),
            blur_p=blur if full_side >= cfg.blur_min_size else 0.0,
            blur_kernel=blur_kernel_size(side, cfg.blur_kernel_frac),
            blur_sigma=(cfg.blur_sigma[0], cfg.blur_sigma[1]),
            solarize_p=solarize,
            solarize_threshold=cfg.solarize_threshold,
        )

    specs = [spec(size, full, crop_scale, blur_p[i], solarize_p[i]) for i in range(2)]
    local_full = cfg.local_crop_size or max(1, round(full * 96 / 224))  # DINO: 96 px locals for 224 px globals
    local_size = max(1, round(local_full * size / full))
    specs += [spec(local_size, local_full, cfg.local_crop_scale, cfg.local_blur_p, 0.0)] * cfg.local_crops
    return specs


class ViewPipeline(nn.Module):
    """One view: crop + flip, colour jitter, grayscale, blur, solarise, normalise, all batched."""

    def __init__(
        self,
        spec: ViewSpec,
        mean: Sequence[float],
        std: Sequence[float],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Args:
        spec: The view's parameters.
        mean: Backbone normalisation mean (timm data config).
        std: Backbone normalisation std.
        dtype: Output dtype (e.g. bfloat16 for mixed-precision training).
        """
        super().__init__()
        self.spec, self.dtype = spec, dtype
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", 1.0 / std_t, persistent=False)  # (x - mean) / std = x * scale + shift
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, images: torch.Tensor, rng: ViewRNG | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 or [0, 1] float -> ``(B, 3, size, size)`` normalised view in ``dtype``."""
        s, device = self.spec, images.device
        gen = rng.generator if rng is not None else None
        host = rng.host if rng is not None else None
        n, _, height, width = images.shape
        # every parameter of the whole batch is drawn first, so the result does not depend on chunking
        boxes = sampling.crop_boxes(n, height, width, s.crop_scale, s.crop_ratio, gen, device)
        flips = sampling.coin(n, s.flip_p, gen, device)
        factors = sampling.jitter_factors(n, s.brightness, s.contrast, s.saturation, s.hue, gen, device)
        order = sampling.permutation(4, host if host is not None else torch.default_generator)
        jitter = sampling.coin(n, s.jitter_p, gen, device)
        gray = sampling.coin(n, s.grayscale_p, gen, device)
        sigma = sampling.uniform((n,), *s.blur_sigma, gen, device)
        blur = sampling.coin(n, s.blur_p, gen, device)
        solar = sampling.coin(n, s.solarize_p, gen, device)

        out = torch.empty((n, 3, s.size, s.size), dtype=self.dtype, device=device)
        on_cpu = device.type == "cpu"
        chunk = max(1, CPU_CHUNK_BYTES // (3 * s.size * s.size * 4)) if on_cpu else n
        for start in range(0, n, chunk):  # chunks of the batch, not samples: bounded by cache, not by B
            part = slice(start, start + chunk)
            x = AF.resized_crop(to_unit_float(images[part]), boxes[part], flips[part], (s.size, s.size))
            if s.jitter_p > 0:
                _apply(x, jitter[part], on_cpu, partial(_jitter, order, factors[part], jitter[part]))
            if s.grayscale_p > 0:
                _apply(x, gray[part], on_cpu, partial(_grayscale, gray[part]))
            if s.blur_p > 0:
                _apply(x, blur[part], on_cpu, partial(_blur, s.blur_kernel, sigma[part], blur[part]))
            if s.solarize_p > 0:
                _apply(x, solar[part], on_cpu, partial(_solarize, s.solarize_threshold, solar[part]))
            if self.dtype == torch.float32:
                torch.addcmul(self.shift, x, self.scale, out=out[part])
            else:
                out[part] = torch.addcmul(self.shift, x, self.scale)
        return out


# The ops of a view, as ``_apply`` calls them: ``index`` None means the whole batch, each sample with
# its own parameters and the identity where ``mask`` is not set (no host sync); otherwise ``v`` holds
# only the chosen samples and ``index`` picks their parameters.


def _jitter(
    order: list[int], factors: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None
) -> torch.Tensor:
    return AF.color_jitter_(v, _identity_where_not(factors, mask) if index is None else factors[index], order)


def _grayscale(mask: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return AF.random_grayscale_(v, mask) if index is None else AF.grayscale(v).expand_as(v)


def _blur(
    kernel: int, sigma: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None
) -> torch.Tensor:
    return AF.gaussian_blur(v, sigma * mask if index is None else sigma[index], kernel)


def _solarize(threshold: float, mask: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return AF.solarize_(v, mask if index is None else _all(v), threshold)


def _all(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)


def _identity_where_not(factors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Colour-jitter factors with the identity ``(1, 1, 1, 0)`` where ``mask`` is not set."""
    identity = torch.ones_like(factors[:1])
    identity[:, 3] = 0.0
    return torch.where(mask[:, None], factors, identity)


def _apply(
    x: torch.Tensor,
    mask: torch.Tensor,
    on_cpu: bool,
    op: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> None:
    """Applies ``op`` to the samples of ``x`` where ``mask`` is set, writing into ``x``.

    On a CPU the chosen samples are gathered first (reading the mask costs no device sync there),
    so a p=0.2 op runs on a fifth of the batch. On an accelerator ``op`` runs on the whole batch
    with ``index=None`` and must itself leave unchosen samples unchanged (identity parameters):
    no host synchronisation.

    Args:
        x: ``(N, 3, H, W)`` views, modified in place.
        mask: ``(N,)`` bool, the samples the op applies to.
        on_cpu: Whether ``x`` lives on the CPU.
        op: ``op(images, index)``, returns the new images; ``index`` selects the per-sample parameters.
    """
    if on_cpu:
        index = mask.nonzero().squeeze(1)
        if index.numel() == len(x):  # every sample: no gather / scatter
            x.copy_(op(x, index))
        elif index.numel():
            x[index] = op(x[index], index)
    else:
        x.copy_(op(x, None))


class KorniaViewPipeline(nn.Module):
    """The same view built from Kornia's augmentation modules (reference; ``augment.backend=kornia``).

    Kornia draws from torch's global generator; seed it with ``torch.manual_seed``.
    """

    def __init__(
        self, spec: ViewSpec, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
    ) -> None:
        """Args: as :class:`ViewPipeline`."""
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.dtype = dtype
        self.spec = spec

    @property
    def spec(self) -> ViewSpec:
        """The view's parameters; setting them rebuilds the Kornia modules."""
        return self._spec

    @spec.setter
    def spec(self, spec: ViewSpec) -> None:
        self._spec = s = spec
        ops: list[nn.Module] = [
            K.RandomResizedCrop((s.size, s.size), scale=s.crop_scale, ratio=s.crop_ratio),
            K.RandomHorizontalFlip(p=s.flip_p),
        ]
        if s.jitter_p > 0:
            ops.append(K.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue, p=s.jitter_p))
        if s.grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=s.grayscale_p))
        if s.blur_p > 0:
            ops.append(K.RandomGaussianBlur((s.blur_kernel, s.blur_kernel), s.blur_sigma, p=s.blur_p))
        if s.solarize_p > 0:
            ops.append(
                K.RandomSolarize(thresholds=(s.solarize_threshold, s.solarize_threshold), additions=0.0, p=s.solarize_p)
            )
        self.ops = nn.Sequential(*ops).to(self.normalize.mean.device)  # Kornia draws on its modules' device

    def forward(self, images: torch.Tensor, rng: ViewRNG | None = None) -> torch.Tensor:
        """As :meth:`ViewPipeline.forward`; ``rng`` is not used (Kornia uses the global generator)."""
        return self.normalize(self.ops(to_unit_float(images))).to(self.dtype)


class MultiView(nn.Module):
    """One pipeline per view; maps a batch to the list of its view batches.

    ``forward(images)`` returns ``[global_1, global_2, local_1, ...]``. A uint8 batch stays uint8;
    each view converts the chunk it works on (in cache, rather than one large float copy).
    """

    def __init__(
        self,
        views: Sequence[nn.Module],
        rng: ViewRNG | None = None,
        specs_at: Callable[[int], list[ViewSpec]] | None = None,
    ) -> None:
        """Args:
        views: One module per view (each with a settable ``spec``, for :meth:`set_side`).
        rng: Random state shared by the views (None: global RNG).
        specs_at: The views' specs for a global side (progressive resolution; None: fixed sides).
        """
        super().__init__()
        self.views = nn.ModuleList(views)
        self.rng = rng
        self.specs_at = specs_at

    @property
    def side(self) -> int:
        """The global views' current side in pixels."""
        spec = self.views[0].spec
        assert isinstance(spec, ViewSpec)
        return spec.size

    def sides_at(self, side: int) -> list[int]:
        """The side of every view (global, then local) when the global views are ``side`` px."""
        if self.specs_at is None:
            return [self.side] * len(self.views)
        return [spec.size for spec in self.specs_at(side)]

    def set_side(self, side: int) -> None:
        """Makes the global views ``side`` px from the next batch on (local views in proportion)."""
        if self.specs_at is None:
            raise ValueError("these views have fixed sides: build them with build_views to change the side")
        for view, spec in zip(self.views, self.specs_at(side), strict=True):
            cast(ViewPipeline | KorniaViewPipeline, view).spec = spec

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> list of ``(B, 3, S_v, S_v)`` views, one per pipeline."""
        return [view(images, self.rng) for view in self.views]


def build_views(
    cfg: AugmentConfig,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MultiView:
    """Builds the multi-view augmentation that an augment config describes.

    Args:
        cfg: The resolved augment section.
        image_size: Side of the loader's images (the global view side when ``cfg.crop_size`` is 0).
        mean: Backbone normalisation mean.
        std: Backbone normalisation standard deviation.
        seed: Seeds the views' own generators; ``None`` draws from torch's global generator.
        device: Where the views are made (the module and its generators are placed there).
        dtype: Output dtype of the views.

    Returns:
        A module mapping a batch to ``[global_1, global_2, local_1, ...]``.
    """
    cls = {"fast": ViewPipeline, "kornia": KorniaViewPipeline}[cfg.backend]
    views = [cls(spec, mean, std, dtype) for spec in view_specs(cfg, image_size)]
    rng = ViewRNG(seed, device) if seed is not None else None
    return MultiView(views, rng, partial(view_specs, cfg, image_size)).to(device)
