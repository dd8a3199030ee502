"""twinview.augment: contrastive view pipelines made on the accelerator with Kornia."""

from twinview.augment.views import MultiView, Normalize, SimCLRView, build_views

__all__ = ["MultiView", "Normalize", "SimCLRView", "build_views"]
