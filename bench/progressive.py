"""Progressive resolution against fixed-size views: time to accuracy on Imagewoof-96.

Trains ``moco-v2-photos`` twice on the Imagewoof-96 protocol of ``bench/methods.py`` (9,025 train
images at 96 px, scored on the 3,929 ``val`` images), once as shipped and once with
``augment.progressive_min`` (the global views start at ``--min`` px and grow to the recipe's 64 px),
for the same epochs, one after the other in one invocation on one host, each in its own process
through ``bench/methods.py --child twinview``. Both record the kNN monitor every ``--monitor-every``
epochs, so each side's curve is kNN against training seconds (the monitor's own time excluded).

Output (JSON on stdout, records appended to ``--out``): per variant its s/epoch, view side per epoch,
kNN curve, final kNN and probe; then the comparison: the progressive run's training time to the
fixed run's final kNN as a fraction of the fixed run's time (below 1: the same accuracy sooner), and
the final kNN ratio.

Usage: python bench/progressive.py [--epochs 20] [--min 32] [--ramp 0.5,0.85] [--multiple 16]
    [--monitor-every 2] [--precision auto|no|bf16] [--imagewoof ARCHIVE_OR_DIR] [--out runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from methods import PROTOCOLS, _ratio, _spawn, time_to_reach

BENCH = Path(__file__).resolve().parent
RECIPE = "moco-v2-photos"


def compare(fixed: dict[str, Any], progressive: dict[str, Any]) -> dict[str, Any]:
    """Time to accuracy both ways and the end points, from two finished monitored records."""
    finals = [[k for k in r.get("knn_per_epoch", []) if k is not None][-1] for r in (fixed, progressive)]
    to_fixed = time_to_reach(progressive, finals[0])
    fixed_seconds = fixed["epoch_end_train_seconds"][-1]
    return {
        "fixed_final_knn": finals[0],
        "progressive_final_knn": finals[1],
        "knn_ratio": _ratio(finals[1], finals[0]),
        "probe_ratio": _ratio(progressive["probe_top1"], fixed["probe_top1"]),
        "fixed_train_seconds": fixed_seconds,
        "progressive_train_seconds": progressive["epoch_end_train_seconds"][-1],
        "train_time_ratio": _ratio(progressive["epoch_end_train_seconds"][-1], fixed_seconds),
        "progressive_seconds_to_fixed_final": to_fixed,
        "time_to_accuracy_ratio": _ratio(to_fixed, fixed_seconds),
        "fixed_seconds_to_progressive_final": time_to_reach(fixed, finals[1]),
    }


def main() -> None:
    from twinview.pretrain.data.builtin import cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--min", type=int, default=32, help="augment.progressive_min")
    parser.add_argument("--ramp", default="0.5,0.85", help="augment.progressive_ramp")
    parser.add_argument("--multiple", type=int, default=16, help="augment.progressive_multiple")
    parser.add_argument("--monitor-every", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="train.mixed_precision of both runs")
    parser.add_argument("--variants", default="fixed,progressive", help="which runs, in this order")
    parser.add_argument("--imagewoof", help="Imagewoof-96 archive or extracted folder (default: $TWINVIEW_IMAGEWOOF)")
    parser.add_argument("--output-dir", default=str(cache_dir() / "bench-runs"))
    parser.add_argument("--out", type=Path, help="append one JSON line per finished run")
    parser.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests
    args = parser.parse_args()

    protocol = PROTOCOLS["imagewoof"]
    source = Path(args.imagewoof or os.environ.get(protocol.env, "") or protocol.archive)
    if not source.exists():
        sys.exit(f"no Imagewoof-96 at {source}: pass --imagewoof or set {protocol.env}")
    progressive = [
        f"augment.progressive_min={args.min}",
        f"augment.progressive_ramp=[{args.ramp}]",
        f"augment.progressive_multiple={args.multiple}",
    ]
    invocation = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    records: dict[str, dict[str, Any]] = {}
    for variant in args.variants.split(","):
        overrides = [f"train.mixed_precision={args.precision}", *(progressive if variant == "progressive" else [])]
        command = [sys.executable, str(BENCH / "methods.py"), "--child", "twinview", "--protocol", "imagewoof"]
        command += ["--method", "moco_v2", "--recipe", RECIPE, "--epochs", str(args.epochs), "--monitor"]
        command += ["--monitor-every", str(args.monitor_every), "--data", str(source), "--output-dir", args.output_dir]
        command += ["--max-steps", str(args.max_steps), *[f"--override={o}" for o in overrides]]
        print(f"[progressive] {variant}: {RECIPE} {' '.join(overrides)}", file=sys.stderr)
        record, wall, tree_peak, tail = _spawn(command)
        base_peak = {"peak_rss_mb_process_tree": tree_peak}
        base = {
            "variant": variant,
            "invocation": invocation,
            "epochs": args.epochs,
            "wall_seconds": round(wall, 1),
            **base_peak,
        }
        record = {**base, **record} if record is not None else {**base, "error": tail or "failed"}
        records[variant] = record
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    ok = {v: r for v, r in records.items() if "error" not in r}
    result: dict[str, Any] = {"benchmark": "progressive", "recipe": RECIPE, "epochs": args.epochs, "runs": records}
    if {"fixed", "progressive"} <= set(ok):
        result["comparison"] = compare(ok["fixed"], ok["progressive"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
