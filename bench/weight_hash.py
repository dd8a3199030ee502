"""The weight hash of a shipped recipe after a few optimiser steps: a refactor's behaviour check.

Trains ``--recipe`` for one epoch of ``--steps`` steps on a folder of CIFAR-10 images and prints
the sha256 over the exported ``model.safetensors`` (sorted keys and raw bytes). A change that
should not alter behaviour must leave it unchanged on the same machine (float rounding differs
between CPU kinds and torch builds, so compare hashes from one machine only).

The variants (``--variants``) add the paths a recipe's defaults do not take: gradient accumulation
(cached, independent), the non-finite check on the device and off, bf16 autocast, the device cache
and MoCo v3.

Usage: python bench/weight_hash.py --data /tmp/cifar10-jpeg/train [--recipe simclr-cifar10] [--steps 8] [--variants]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.train import train

# name -> (recipe, extra overrides): paths of the training step the shipped recipes do not take
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "simclr-accumulate-cached": ("simclr-cifar10", ["train.grad_accumulation=2", "train.batch_size=128"]),
    "moco-v2-accumulate-independent": (
        "moco-v2-cifar10",
        ["train.grad_accumulation=2", "train.batch_size=128", "train.grad_accumulation_mode=independent"],
    ),
    "moco-v2-guard-device": ("moco-v2-cifar10", ["train.nonfinite_check=device"]),
    "simclr-guard-off": ("simclr-cifar10", ["train.max_nonfinite_steps=0"]),
    "moco-v3-guard-device": (
        "simclr-cifar10",
        ["objective.name=moco_v3", "augment.recipe=moco_v3", "train.nonfinite_check=device", "train.batch_size=128"],
    ),
    "simclr-bf16-device-cache": ("simclr-cifar10", ["train.mixed_precision=bf16", "data.cache=device"]),
}


def weight_hash(path: Path) -> str:
    """sha256 over the sorted tensor names and their raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an image folder, e.g. cifar10-jpeg/train")
    parser.add_argument(
        "--recipe", action="append", help="shipped recipe(s); default simclr, moco-v2, supcon on CIFAR-10"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", action="store_true", help="also the variants in VARIANTS")
    args = parser.parse_args()
    out = {
        "bench": "weight_hash",
        "host": platform.processor() or platform.machine(),
        "steps": args.steps,
        "hashes": {},
    }
    runs = {r: (r, []) for r in args.recipe or ["simclr-cifar10", "moco-v2-cifar10", "supcon-cifar10"]}
    if args.variants:
        runs |= VARIANTS
    for name, (recipe, extra) in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                recipe,
                [
                    f"data.path={args.data}",
                    "train.epochs=1",
                    f"train.max_steps_per_epoch={args.steps}",
                    f"train.output_dir={tmp}",
                    "train.run_name=h",
                    "train.log_every=4",
                    *extra,
                ],
            )
            with contextlib.redirect_stdout(sys.stderr):
                weights = train(cfg, Path(tmp) / "h")
            out["hashes"][name] = weight_hash(weights)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
