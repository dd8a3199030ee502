"""Side by side with lightly: the Imagewoof-96 protocol of ``bench/imagewoof_quick.py`` run with
lightly's SimCLR pieces, right after twinview's run, in the same process tree on the same host.

lightly (never a twinview dependency) trains what its SimCLR
benchmark trains (``benchmarks/imagenet/resnet50/simclr.py`` in the lightly repository), at this
protocol's sizes: its ``SimCLRTransform`` (64 px crops, colour jitter, grayscale, blur) in 2
DataLoader workers, its ``SimCLRProjectionHead``, its ``NTXentLoss`` (T 0.1) and its benchmark
optimiser (LARS, lr 0.075 x sqrt(batch), momentum 0.9, weight decay 1e-6 off norms and biases,
``CosineWarmupScheduler`` with 1 warm-up epoch per 10). The backbone is the same timm ResNet-18 as
twinview's (torchvision's ResNet-18 under timm's names), and both runs are scored by the same
frozen-feature kNN (k=200, T=0.1) and linear probe, val against train, at 96 px.

Prints one JSON object with both runs and the ratios the photos issue sets targets for: kNN top-1
twinview / lightly (target >= 1.1) and seconds per epoch twinview / lightly (target <= 0.7).

lightly needs hydra-core, which pins omegaconf below 2.4, the version twinview needs: install it
into a separate environment, e.g. ``python -m venv .venv-peer && .venv-peer/bin/pip install
torch==2.14.1 torchvision==0.29.1 && .venv-peer/bin/pip install -e . lightly``, and run this
script with that environment's python (twinview's training there gave results bit-identical to
its own environment's).

``--method`` runs another of lightly's methods instead of SimCLR (its settings:
``bench/peer_methods.py``); ``bench/methods.py`` runs every method on both CPU protocols.

Usage: python bench/peer_lightly.py [--epochs 8] [--recipe simclr-photos] [--method simclr] [--no-probe]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from host import host_kind
from peer_methods import LIGHTLY_METHODS, Setup
from peer_methods import train_lightly as train_lightly_method

from twinview.evaluate.features import Embedder
from twinview.evaluate.run import default_device, evaluate
from twinview.pretrain.app.evaluation import labelled_pair
from twinview.pretrain.config import load_config
from twinview.pretrain.data.builtin import extract_archive
from twinview.pretrain.models import normalization_stats

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagewoof-96.tar.gz"
BATCH, CROP, IMAGE, WORKERS = 256, 64, 96, 2


def train_lightly(
    train_dir: Path, epochs: int, seed: int = 0, method: str = "simclr"
) -> tuple[torch.nn.Module, list[float]]:
    """lightly's benchmark recipe of ``method`` (``bench/peer_methods.py``; SimCLR: the recipe
    described above), as a plain PyTorch loop; returns the backbone and the seconds of each epoch."""
    setup = Setup(
        train_dir,
        epochs,
        crop=CROP,
        small=False,
        backbone=lambda: timm.create_model("resnet18", num_classes=0),
        batch_size=BATCH,
        workers=WORKERS,
        seed=seed,
    )
    result = train_lightly_method(method, setup)
    return result.backbone, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path(os.environ.get("TWINVIEW_IMAGEWOOF", DEFAULT_ARCHIVE)))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--recipe", default="simclr-photos")
    parser.add_argument("--method", default="simclr", choices=LIGHTLY_METHODS, help="lightly's method to run")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--skip-twinview", type=Path, default=None, help="reuse an imagewoof_quick.py JSON")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(json.dumps({"skipped": f"Imagewoof-96 archive not found at {args.archive}"}))
        sys.exit(0)
    try:
        import lightly
    except ImportError:
        print(json.dumps({"skipped": "lightly is not installed (see this script's docstring)"}))
        sys.exit(0)
    root = extract_archive(args.archive) / "imagewoof-96"

    if args.skip_twinview:
        ours: dict[str, Any] = json.loads(args.skip_twinview.read_text())
    else:  # twinview first, in its own process (its own threads and workers), then lightly here
        command = [sys.executable, str(Path(__file__).with_name("imagewoof_quick.py")), "--epochs", str(args.epochs)]
        command += ["--recipe", args.recipe, "--archive", str(args.archive)] + (["--no-probe"] if args.no_probe else [])
        ours = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    backbone, seconds = train_lightly(root / "train", args.epochs, method=args.method)
    cfg = load_config(args.recipe, [f"data.path={root / 'train'}", f"data.image_size={IMAGE}"])
    reference, query = labelled_pair(str(root / "train"), str(root / "val"), IMAGE)
    mean, std = normalization_stats(backbone)
    embedder = Embedder(backbone, mean, std, cfg.eval.batch_size, cfg.data.num_workers, default_device())
    peer = evaluate(embedder, reference, query, cfg.eval, cfg.augment, probe=not args.no_probe, seed=cfg.train.seed)
    theirs = {
        "seconds_per_epoch_median": statistics.median(seconds),
        "seconds_per_epoch": [round(s, 2) for s in seconds],
        "knn_top1": peer.knn.top1,
        **({"probe_top1": peer.linear_probe.top1} if peer.linear_probe is not None else {}),
    }
    print(
        json.dumps(
            {
                "benchmark": "peer_lightly",
                "machine": f"{host_kind()}, torch {torch.__version__}, lightly {lightly.__version__}",
                "epochs": args.epochs,
                "lightly_method": args.method,
                "twinview": ours,
                "lightly": theirs,
                "knn_ratio": ours["knn_top1"] / theirs["knn_top1"],
                "seconds_per_epoch_ratio": ours["seconds_per_epoch_median"] / theirs["seconds_per_epoch_median"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
