"""The quick CIFAR-10 protocol: 10 epochs of SimCLR on 10,000 images, then kNN on the test set.

The first 1,000 training images of each class (sorted file names) are linked into a folder in the
cache; timm ``resnet18`` with its standard stem at 32x32, batch 256, recipe ``simclr-cifar10``. kNN
(k=200, T=0.1) of the full 10,000-image test set against those 10,000 training images, for the
trained backbone and for a random-init copy. Prints one JSON object.

Usage: python bench/cifar10_quick.py [--epochs 10] [--recipe simclr-cifar10] [--archive PATH] [KEY=VALUE ...]
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

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = 1000


def quick_subset(root: Path, per_class: int) -> Path:
    """Links the first ``per_class`` training images of each class (sorted names) into a folder."""
    target = cache_dir() / f"cifar10-quick-{per_class}"
    if (target / ".complete").is_file():
        return target
    for class_dir in sorted((root / "train").iterdir()):
        out = target / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    (target / ".complete").touch()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path(os.environ.get("TWINVIEW_CIFAR10", DEFAULT_ARCHIVE)))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--recipe", default="simclr-cifar10", help="shipped recipe (simclr-cifar10, moco-v2-cifar10, ...)"
    )
    parser.add_argument("--output-dir", default=str(cache_dir() / "bench-runs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(json.dumps({"skipped": f"CIFAR-10 archive not found at {args.archive}"}))
        sys.exit(0)
    root = extract_archive(args.archive) / "cifar10-jpeg"
    train_dir = quick_subset(root, PER_CLASS)
    cfg = load_config(
        args.recipe,
        [
            f"data.path={train_dir}",
            f"train.epochs={args.epochs}",
            f"train.output_dir={args.output_dir}",
            f"train.run_name=quick-{time.strftime('%Y%m%d-%H%M%S')}",
            "train.checkpoint_every=1000",
            *args.overrides,
        ],
    )
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        train(cfg, run_dir)
    train_seconds = time.perf_counter() - started
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    model = load_model(run_dir)
    reference, query = labelled_pair(str(train_dir), str(root / "test"), cfg.data.size)
    t0 = time.perf_counter()
    trained = evaluate(model.embedder(), reference, query, cfg.eval, cfg.augment, seed=cfg.train.seed)
    eval_seconds = time.perf_counter() - t0
    random_init = model.embedder(backbone=model.random_init())
    baseline = evaluate(random_init, reference, query, cfg.eval, cfg.augment, seed=cfg.train.seed)
    print(
        json.dumps(
            {
                "benchmark": "cifar10_quick",
                "machine": f"{host_kind()}, torch {torch.__version__}, cuda={torch.cuda.is_available()}",
                "recipe": args.recipe,
                "objective": cfg.objective.name,
                "backbone": cfg.model.backbone,
                "epochs": cfg.train.epochs,
                "batch_size": cfg.train.batch_size,
                "train_images": trained.knn.num_reference,
                "seconds_per_epoch_median": statistics.median(e["seconds"] for e in epochs),
                "seconds_per_epoch": [round(e["seconds"], 2) for e in epochs],
                "images_per_s_median": statistics.median(e["images_per_s"] for e in epochs),
                "train_seconds_total": train_seconds,
                "final_loss": epochs[-1]["loss"],
                "knn_top1": trained.knn.top1,
                "knn_top5": trained.knn.top5,
                "knn_top1_random_init": baseline.knn.top1,
                "knn_top5_random_init": baseline.knn.top5,
                "eval_seconds": eval_seconds,
                "run_dir": str(run_dir),
                "overrides": args.overrides,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
