"""Contrastive views made on the training device with Kornia, batched, per-sample random parameters.

The data loader hands over uint8 ``(B, 3, S, S)`` batches; everything here runs on the batch's
device with no per-sample Python loop and no host synchronisation. Kornia draws fresh random
parameters for every sample (``same_on_batch=False``) and every call, so the two views of an image
differ, and two copies of one image in a batch get different views. Random numbers come from
torch's global generator (seeded by the training loop via Accelerate's ``set_seed``).
"""

from __future__ import annotations

import math
from typing import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from twinview.pretrain.config import AugmentConfig

SMALL_IMAGE_MAX_SIDE = 32  # SimCLR leaves blur off for CIFAR-sized images (Chen et al. 2020, B.9)


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
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalises a ``(B, C, H, W)`` batch; returns float32."""
        return (to_unit_float(images) - self.mean) / self.std


def blur_kernel_size(side: int, fraction: float) -> int:
    """Odd Gaussian kernel side of about ``fraction`` of the image side (at least 3)."""
    k = max(3, int(math.ceil(side * fraction)))
    return k if k % 2 == 1 else k + 1


class SimCLRView(nn.Module):
    """One SimCLR view (Chen et al. 2020): crop, flip, colour jitter, grayscale, blur, normalise.

    Each call draws new parameters for every sample in the batch.
    """

    def __init__(self, cfg: AugmentConfig, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Builds the Kornia pipeline.

        Args:
            cfg: Recipe parameters.
            size: Output side of the view in pixels.
            mean: Backbone normalisation mean.
            std: Backbone normalisation standard deviation.
        """
        super().__init__()
        s = cfg.jitter_strength
        ops: list[nn.Module] = [
            K.RandomResizedCrop((size, size), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio)),
            K.RandomHorizontalFlip(p=cfg.flip_p),
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.grayscale_p),
        ]
        if cfg.blur_p > 0 and size > SMALL_IMAGE_MAX_SIDE:
            k = blur_kernel_size(size, cfg.blur_kernel_frac)
            ops.append(K.RandomGaussianBlur((k, k), tuple(cfg.blur_sigma), p=cfg.blur_p))
        self.ops = nn.Sequential(*ops)
        self.normalize = Normalize(mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8/float -> ``(B, 3, size, size)`` normalised float32 view."""
        return self.normalize(self.ops(to_unit_float(images)))


class MultiView(nn.Module):
    """Applies one pipeline per view to the same batch and returns the list of view batches."""

    def __init__(self, views: Sequence[nn.Module]) -> None:
        """Args: views: One module per view (they may be the same recipe or asymmetric)."""
        super().__init__()
        self.views = nn.ModuleList(views)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> list of ``(B, 3, S, S)`` views, one per pipeline."""
        return [view(images) for view in self.views]


def build_views(
    cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int = 2
) -> MultiView:
    """Builds the multi-view augmentation for a recipe.

    Args:
        cfg: The augment section of the config.
        image_size: Side of the loader's images (used when ``cfg.crop_size`` is 0).
        mean: Backbone normalisation mean.
        std: Backbone normalisation standard deviation.
        num_views: Number of views per image.

    Returns:
        A module mapping a batch to a list of ``num_views`` view batches.
    """
    if cfg.recipe != "simclr":
        raise ValueError(f"unknown augment.recipe '{cfg.recipe}'. Recipes: simclr.")
    size = cfg.crop_size or image_size
    return MultiView([SimCLRView(cfg, size, mean, std) for _ in range(num_views)])
