"""twinview.augment: contrastive view pipelines made on the accelerator, batched, per-sample random.

``twinview.augment.config`` (the config section and the recipes) imports nothing heavy; the view
pipelines (Kornia, torch) load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RECIPES": "twinview.augment.config",
    "AugmentConfig": "twinview.augment.config",
    "ViewRNG": "twinview.augment.sampling",
    "KorniaViewPipeline": "twinview.augment.views",
    "MultiView": "twinview.augment.views",
    "Normalize": "twinview.augment.views",
    "ViewPipeline": "twinview.augment.views",
    "ViewSpec": "twinview.augment.views",
    "build_views": "twinview.augment.views",
    "view_specs": "twinview.augment.views",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'twinview.augment' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)
