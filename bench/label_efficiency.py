"""Does pretraining pay? Label efficiency on Imagewoof-96: fine-tuned from a pretrained backbone,
from scratch, and the linear probe, with 1 %, 10 % and 100 % of the training labels.

Imagewoof (10 dog breeds of ImageNet, shorter side 96 px; ``../shared/data/imagewoof-96.tar.gz``):
``twinview finetune``'s whole path (:func:`twinview.pretrain.app.finetuning.finetune_model`) on the
9,025 ``train`` images with their labels, scored on the 3,929 ``val`` images. The pretrained model
is ``--run`` (a run directory or export; e.g. ``moco-v2-photos`` pretrained on the ``train`` images
without labels), or one pretrained here for ``--pretrain-epochs`` epochs with ``--recipe``.

Targets (checked in the output): at 10 % labels the pretrained fine-tune >= scratch + 10 points
top-1; at 1 % labels the pretrained fine-tune >= 1.5x scratch. Prints one JSON object with the
table, the targets and the host kind.

Usage: python bench/label_efficiency.py [--run RUN_DIR | --pretrain-epochs 30 --recipe moco-v2-photos]
    [--labels 1%,10%,100%] [--epochs 30] [--lr LR] [--layer-decay D] [--archive PATH] [--out DIR [--resume]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from host import host_kind

from twinview.pretrain.app.finetuning import FinetuneOptions, finetune_model
from twinview.pretrain.config import load_config
from twinview.pretrain.data.builtin import cache_dir, extract_archive
from twinview.pretrain.engine.train import train

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagewoof-96.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path(os.environ.get("TWINVIEW_IMAGEWOOF", DEFAULT_ARCHIVE)))
    parser.add_argument("--run", type=Path, help="pretrained run directory or export (else pretrain one here)")
    parser.add_argument("--recipe", default="moco-v2-photos")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--labels", default="1%,10%,100%")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (small subsets: >= 200 steps)")
    parser.add_argument("--lr", type=float, help="peak fine-tuning lr (default: finetune's)")
    parser.add_argument("--layer-decay", type=float, help="layer-wise lr decay (default: finetune's; CNNs off)")
    parser.add_argument("--out", type=Path, help="finetune's output folder (default: RUN/finetune-bench-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue (or extend) the fine-tunes in --out")
    args = parser.parse_args()
    if not args.archive.exists():
        print(json.dumps({"skipped": f"Imagewoof-96 not found at {args.archive}"}))
        sys.exit(0)
    root = args.archive if args.archive.is_dir() else extract_archive(args.archive) / "imagewoof-96"
    run_dir = args.run
    pretrain_seconds = None
    if run_dir is None:
        cfg = load_config(
            args.recipe,
            [
                f"data.path={root / 'train'}",
                f"train.epochs={args.pretrain_epochs}",
                f"train.output_dir={cache_dir() / 'bench-runs'}",
                f"train.run_name=label-efficiency-{time.strftime('%Y%m%d-%H%M%S')}",
            ],
        )
        run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
        run_dir.mkdir(parents=True)
        started = time.perf_counter()
        train(cfg, run_dir, recipe=args.recipe)
        pretrain_seconds = round(time.perf_counter() - started, 1)
    out = args.out or run_dir / f"finetune-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    result = finetune_model(
        run_dir,
        str(root / "train"),
        str(root / "val"),
        FinetuneOptions(labels=args.labels, epochs=args.epochs, lr=args.lr, layer_decay=args.layer_decay),
        out,
        resume=args.resume,
    )
    rows = {b.labels: b for b in result.budgets}
    targets = {}
    if "10%" in rows and rows["10%"].scratch is not None:
        gain = rows["10%"].pretrained.top1 - rows["10%"].scratch.top1
        targets["10% labels: pretrained - scratch >= 0.10 top-1"] = {"value": round(gain, 4), "met": gain >= 0.10}
    if "1%" in rows and rows["1%"].scratch is not None:
        ratio = rows["1%"].pretrained.top1 / max(rows["1%"].scratch.top1, 1e-9)
        targets["1% labels: pretrained >= 1.5x scratch"] = {"value": round(ratio, 3), "met": ratio >= 1.5}
    print(
        json.dumps(
            {
                "benchmark": "label_efficiency",
                "host": host_kind(),
                "model": str(run_dir),
                "pretrain_seconds": pretrain_seconds,
                "finetune_seconds": round(time.perf_counter() - started, 1),
                "result": result.to_json(),
                "targets": targets,
                "out": str(out),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
