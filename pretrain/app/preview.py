"""``twinview preview``: a PNG grid of images of a source and their augmented views, so a person can
see what a recipe does to their photos before training on them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from twinview.evaluate.dataset import Images
from twinview.pretrain.config import load_config
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import resolve_data, resolve_image_size


def random_images(dataset: Images, num: int, seed: int) -> torch.Tensor:
    """``(min(num, len), 3, S, S)`` uint8 images of the data set, drawn at random with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=g)[: min(num, len(dataset))].tolist()
    return torch.stack([dataset[i][0] for i in picks])


def run(args: argparse.Namespace) -> int:
    """``twinview preview --data SOURCE [--recipe NAME] [--config RECIPE] [--out PNG] ...``"""
    from twinview.augment.preview import preview

    overrides = [f"data.path={args.data}"]
    if args.recipe:
        overrides.append(f"augment.recipe={args.recipe}")
    if args.size:
        overrides.append(f"data.image_size={args.size}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    source = resolve_data(cfg.data)  # the data the run would read, resolved once
    cfg, size = resolve_image_size(cfg, source)
    if size.auto:
        print(f"image size {size.note}.")
    images = random_images(open_images(source, cfg.data.size), args.num, args.seed)
    out = preview(images, cfg.augment, Path(args.out), seed=args.seed)
    print(f"Wrote {out} ({cfg.augment.recipe} views of {args.num} images from {args.data}).")
    return 0
