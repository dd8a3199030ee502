"""The ``augment`` config section and the named view recipes from the papers that fill it.

Reading a config imports nothing heavy: no Kornia, no torch.

A recipe sets every augment key that is left unset (``None``) in the config; any key set in a YAML
recipe or on the command line wins. Per-view keys (``blur_p``, ``solarize_p``) hold one value for
each of the two global views, which is how the asymmetric BYOL / MoCo v3 views are expressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SIMCLR_JITTER = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2}

RECIPES: dict[str, dict[str, Any]] = {
    # Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
    # appendix A: colour distortion of strength s (0.8s, 0.8s, 0.8s, 0.2s), blur p=0.5.
    "simclr": {
        "crop_scale": (0.08, 1.0),
        **_SIMCLR_JITTER,
        "jitter_p": 0.8,
        "grayscale_p": 0.2,
        "blur_p": (0.5, 0.5),
        "solarize_p": (0.0, 0.0),
    },
    # Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning" (MoCo v2 aug+).
    "moco_v2": {
        "crop_scale": (0.2, 1.0),
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.1,
        "jitter_p": 0.8,
        "grayscale_p": 0.2,
        "blur_p": (0.5, 0.5),
        "solarize_p": (0.0, 0.0),
    },
    # Grill et al. 2020, "Bootstrap Your Own Latent", table 6: asymmetric blur and solarisation.
    "byol": {
        "crop_scale": (0.08, 1.0),
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
        "jitter_p": 0.8,
        "grayscale_p": 0.2,
        "blur_p": (1.0, 0.1),
        "solarize_p": (0.0, 0.2),
    },
}

# Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers": BYOL's views.
RECIPES["moco_v3"] = dict(RECIPES["byol"])

RECIPE_KEYS = frozenset(key for values in RECIPES.values() for key in values)


def recipe_values(name: str) -> dict[str, Any]:
    """The values recipe ``name`` sets.

    Raises:
        KeyError: If there is no such recipe (the message lists the names).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown augment.recipe '{name}'. Recipes: {', '.join(RECIPES)}.")
    return dict(RECIPES[name])


def fill_recipe(augment: AugmentConfig) -> None:
    """Sets every augment key left unset (``None``) to the value of ``augment.recipe``."""
    for key, value in recipe_values(augment.recipe).items():
        if getattr(augment, key) is None:
            setattr(augment, key, value)


@dataclass
class AugmentConfig:
    """The contrastive views, made on the training device (``twinview.augment``).

    Keys marked *recipe* default to ``None``: ``augment.recipe`` fills them with the paper's values
    (``twinview.augment.config``); setting one in YAML or on the command line overrides the recipe.
    Per-view keys take one value for each of the two global views, e.g. ``augment.blur_p=[1.0,0.1]``.

    Attributes:
        recipe: ``simclr``, ``moco_v2``, ``byol`` or ``moco_v3``.
        backend: ``fast`` (twinview's batched ops) or ``kornia`` (Kornia's modules, the reference).
        crop_size: Output side of each global view; ``0`` means ``data.image_size``.
        crop_scale: *recipe*. Area range of the random resized crop.
        crop_ratio: Aspect-ratio range of the random resized crop.
        flip_p: Probability of a horizontal flip.
        brightness: *recipe*. Brightness factor range ``[1 - b, 1 + b]`` (times ``jitter_strength``).
        contrast: *recipe*. Contrast factor range (times ``jitter_strength``).
        saturation: *recipe*. Saturation factor range (times ``jitter_strength``).
        hue: *recipe*. Hue shift range in turns (times ``jitter_strength``, at most 0.5).
        jitter_strength: SimCLR's colour-distortion strength s, multiplying the four ranges above.
        jitter_p: *recipe*. Probability of applying colour jitter.
        grayscale_p: *recipe*. Probability of converting a view to grayscale.
        blur_p: *recipe*, per view. Probability of Gaussian blur.
        blur_kernel_frac: Blur kernel side as a fraction of the view side (rounded up to odd).
        blur_sigma: Range of the blur's standard deviation, in pixels.
        blur_min_size: Views smaller than this are never blurred (SimCLR leaves CIFAR unblurred).
        solarize_p: *recipe*, per view. Probability of solarisation.
        solarize_threshold: Pixels at or above this value (in [0, 1]) are inverted.
        local_crops: Number of extra multi-crop local views (0: none).
        local_crop_size: Side of the local views; ``0`` means 96/224 of the global side.
        local_crop_scale: Area range of the local crops.
        local_blur_p: Blur probability of the local views.
        progressive_min: Progressive resolution (``twinview.augment.progressive``): the side the
            global views start at, growing to their full side (local views scale with them);
            ``0``: off, every epoch at the full side.
        progressive_ramp: Fractions of ``train.epochs`` where the ramp from ``progressive_min``
            to the full side starts and ends (FFCV's ``start_ramp`` / ``end_ramp``).
        progressive_multiple: Sides during the ramp are rounded down to multiples of this (32, as
            FFCV: a ResNet's feature maps then keep even sides, the fast ones on the CPUs measured).
    """

    recipe: str = "simclr"
    backend: str = "fast"
    crop_size: int = 0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    jitter_strength: float = 1.0
    jitter_p: float | None = None
    grayscale_p: float | None = None
    blur_p: tuple[float, float] | None = None
    blur_kernel_frac: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_min_size: int = 33
    solarize_p: tuple[float, float] | None = None
    solarize_threshold: float = 0.5
    local_crops: int = 0
    local_crop_size: int = 0
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_blur_p: float = 0.5
    progressive_min: int = 0
    progressive_ramp: tuple[float, float] = (0.5, 0.85)
    progressive_multiple: int = 32
