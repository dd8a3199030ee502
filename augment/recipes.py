"""Named view recipes from the papers: the values ``augment.recipe`` fills in.

A recipe sets every augment key that is left unset (``None``) in the config; any key set in a YAML
recipe or on the command line wins. Per-view keys (``blur_p``, ``solarize_p``) hold one value for
each of the two global views, which is how the asymmetric BYOL / MoCo v3 views are expressed.
"""

from __future__ import annotations

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
