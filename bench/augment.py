"""Two-view augmentation throughput: twinview's batched views vs Kornia vs per-sample torchvision.

For each recipe and size, the same view parameters (``twinview.augment.view_specs``) drive three
implementations, measured in the same run on the same uint8 images:

* ``fast``: twinview's ``ViewPipeline`` on the whole batch (the training default);
* ``kornia``: the same views from Kornia's augmentation modules (``augment.backend=kornia``);
* ``torchvision``: the usual per-sample ``torchvision.transforms.v2`` pipeline, two views per image,
  run where it normally runs, in DataLoader workers (one per core, one thread each).

Throughput is source images per second (each gives two views), the median of ``--repeats`` timed
passes after one warm-up, the implementations' passes interleaved. Prints one JSON object.

Usage: python bench/augment.py [--sizes 32 96 224] [--recipes simclr moco_v2 byol] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from host import host_kind
from torch.utils.data import DataLoader, Dataset

from twinview.augment.config import RECIPES
from twinview.augment.views import ViewSpec, build_views, view_specs
from twinview.pretrain.config import load_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth colourful uint8 images (random 8x8 colour fields upsampled), like photos to the ops."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 8, 8), generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1).mul(255).byte()


def torchvision_view(spec: ViewSpec) -> T.Compose:
    """The per-sample torchvision.transforms.v2 pipeline for one view spec, on uint8 tensors."""
    ops: list[Any] = [
        T.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.jitter_p > 0:
        jitter = T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        ops.append(T.RandomApply([jitter], p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(T.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=round(255 * spec.solarize_threshold), p=spec.solarize_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


class TwoViewDataset(Dataset):
    """Per-sample two-view dataset over in-memory uint8 images (what a DataLoader worker would run)."""

    def __init__(self, images: torch.Tensor, specs: list[ViewSpec]) -> None:
        self.images = images
        self.views = [torchvision_view(s) for s in specs[:2]]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return self.views[0](image), self.views[1](image)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function; one warm-up each, then the repeats interleaved so that
    the host's load drifts affect every implementation alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--batch", type=int, default=128, help="source images per pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="torchvision DataLoader workers")
    parser.add_argument("--skip-kornia", action="store_true")
    args = parser.parse_args()

    results = []
    for size in args.sizes:
        images = synthetic_images(args.batch, size)
        for recipe in args.recipes:
            cfg = load_config(None, ["data.path=unused", f"augment.recipe={recipe}"]).augment
            specs = view_specs(cfg, size)[:2]
            row: dict[str, Any] = {"recipe": recipe, "size": size, "blur": [s.blur_p for s in specs]}

            fast = build_views(cfg, size, MEAN, STD, seed=0)
            fns: dict[str, Callable[[], Any]] = {"fast": partial(fast, images)}
            if not args.skip_kornia:
                cfg.backend = "kornia"
                kornia = build_views(cfg, size, MEAN, STD)
                fns["kornia"] = partial(kornia, images)
            loader = DataLoader(
                TwoViewDataset(images, specs),
                batch_size=32,
                num_workers=args.workers,
                worker_init_fn=_one_thread,
                persistent_workers=True,
            )
            fns["torchvision"] = partial(list, loader)
            for name, seconds in interleaved_medians(fns, args.repeats).items():
                row[f"{name}_images_per_s"] = args.batch / seconds
            del fns, loader  # stops the persistent workers
            base = row["torchvision_images_per_s"]
            row["fast_vs_torchvision"] = row["fast_images_per_s"] / base
            if "kornia_images_per_s" in row:
                row["kornia_vs_torchvision"] = row["kornia_images_per_s"] / base
            results.append(row)
            print(json.dumps(row), file=sys.stderr)

    print(
        json.dumps(
            {
                "benchmark": "augment",
                "machine": f"{host_kind()}, torch {torch.__version__}, threads={torch.get_num_threads()}",
                "batch": args.batch,
                "repeats": args.repeats,
                "unit": "source images/s, two views each",
                "results": results,
                "min_fast_vs_torchvision": min(r["fast_vs_torchvision"] for r in results),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
