"""twinview.augment: contrastive view pipelines made on the accelerator, batched, per-sample random."""

from twinview.augment.recipes import RECIPES
from twinview.augment.sampling import ViewRNG
from twinview.augment.views import KorniaViewPipeline, MultiView, Normalize, ViewPipeline, ViewSpec, build_views, view_specs

__all__ = [
    "RECIPES",
    "KorniaViewPipeline",
    "MultiView",
    "Normalize",
    "ViewPipeline",
    "ViewRNG",
    "ViewSpec",
    "build_views",
    "view_specs",
]
