"""The photo yardstick: SimCLR on Imagewoof-96 for a fixed number of epochs, then kNN and a linear probe.

Imagewoof (10 dog breeds of ImageNet, shorter side 96 px; ``../shared/data/imagewoof-96.tar.gz``):
pretrain on the 9,025 ``train`` images without their labels, with recipe ``simclr-photos``
(timm ``resnet18``, images loaded at 96 px, 64 px crops) or another via ``--recipe``; then kNN
(k=200, T=0.1) and a linear probe of the frozen backbone, ``val`` (3,929 images) against
``train``, for the trained backbone and a random-init copy. Prints one JSON object.

Usage: python bench/imagewoof_quick.py [--epochs 10] [--recipe simclr-photos] [--archive PATH] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from host import host_kind

from twinview.evaluate.run import evaluate
from twinview.pretrain.app.evaluation import labelled_pair
from twinview.pretrain.app.model import load_model
from twinview.pretrain.config import load_config
from twinview.pretrain.data.builtin import cache_dir, extract_archive
from twinview.pretrain.engine.train import train

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagewoof-96.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path(os.environ.get("TWINVIEW_IMAGEWOOF", DEFAULT_ARCHIVE)))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--recipe", default="simclr-photos", help="shipped recipe or YAML file")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe (kNN only)")
    parser.add_argument("--output-dir", default=str(cache_dir() / "bench-runs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(json.dumps({"skipped": f"Imagewoof-96 archive not found at {args.archive}"}))
        sys.exit(0)
    root = extract_archive(args.archive) / "imagewoof-96"
    cfg = load_config(
        args.recipe,
        [
            f"data.path={root / 'train'}",
            f"train.epochs={args.epochs}",
            f"train.output_dir={args.output_dir}",
            f"train.run_name=woof-{time.strftime('%Y%m%d-%H%M%S')}",
            "train.checkpoint_every=1000",
            *args.overrides,
        ],
    )
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        train(cfg, run_dir, recipe=args.recipe)
    train_seconds = time.perf_counter() - started
    model = load_model(run_dir)
    cfg = model.cfg  # the saved config: data.image_size resolved
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    reference, query = labelled_pair(str(root / "train"), str(root / "val"), cfg.data.size)
    t0 = time.perf_counter()
    trained = evaluate(
        model.embedder(), reference, query, cfg.eval, cfg.augment, probe=not args.no_probe, seed=cfg.train.seed
    )
    eval_seconds = time.perf_counter() - t0
    random_init = model.embedder(backbone=model.random_init())
    baseline = evaluate(
        random_init, reference, query, cfg.eval, cfg.augment, probe=not args.no_probe, seed=cfg.train.seed
    )
    probe = {}
    if trained.linear_probe is not None and baseline.linear_probe is not None:  # not with --no-probe
        probe = {
            "probe_top1": trained.linear_probe.top1,
            "probe_top1_random_init": baseline.linear_probe.top1,
        }
    print(
        json.dumps(
            {
                "benchmark": "imagewoof_quick",
                "machine": f"{host_kind()}, torch {torch.__version__}, cuda={torch.cuda.is_available()}",
                "recipe": args.recipe,
                "objective": cfg.objective.name,
                "backbone": cfg.model.backbone,
                "image_size": cfg.data.size,
                "crop_size": cfg.augment.crop_size or cfg.data.size,
                "epochs": cfg.train.epochs,
                "batch_size": cfg.train.batch_size,
                "train_images": trained.knn.num_reference,
                "seconds_per_epoch_median": statistics.median(e["seconds"] for e in epochs),
                "seconds_per_epoch": [round(e["seconds"], 2) for e in epochs],
                "train_seconds_total": train_seconds,
                "final_loss": epochs[-1]["loss"],
                "knn_top1": trained.knn.top1,
                "knn_top1_random_init": baseline.knn.top1,
                **probe,
                "eval_seconds": eval_seconds,
                "run_dir": str(run_dir),
                "overrides": args.overrides,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
