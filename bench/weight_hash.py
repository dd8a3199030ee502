"""The weight hash of a shipped recipe after a few optimiser steps: a refactor's behaviour check.

Trains ``--recipe`` for one epoch of ``--steps`` steps on a folder of CIFAR-10 images and prints
the sha256 over the exported ``model.safetensors`` (sorted keys and raw bytes). A change that
should not alter behaviour must leave it unchanged on the same machine (float rounding differs
between CPU kinds and torch builds, so compare hashes from one machine only).

Usage: python bench/weight_hash.py --data /tmp/cifar10-jpeg/train [--recipe simclr-cifar10] [--steps 8]
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
    args = parser.parse_args()
    out = {
        "bench": "weight_hash",
        "host": platform.processor() or platform.machine(),
        "steps": args.steps,
        "hashes": {},
    }
    for recipe in args.recipe or ["simclr-cifar10", "moco-v2-cifar10", "supcon-cifar10"]:
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
                ],
            )
            with contextlib.redirect_stdout(sys.stderr):
                weights = train(cfg, Path(tmp) / "h")
            out["hashes"][recipe] = weight_hash(weights)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
