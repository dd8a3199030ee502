"""Cost of the training step's safety and accumulation machinery: SimCLR, ResNet-18, LARS, 32 px
(the model and optimiser of the shipped simclr-cifar10 recipe).

* The non-finite guard (``train.max_nonfinite_steps``): ``off`` vs ``sync`` vs ``device`` mode. All
  three run in one process on one model, their steps interleaved (off, sync, device, off, ...), so
  drift of this noisy host hits them alike; the median step of each is reported with its ratio to
  ``off``. ``device`` mode's extra memory is the size of its copy of parameters + optimiser state.
* Gradient accumulation at the same global batch: one pass of ``--batch`` images vs ``--passes``
  passes of ``batch / passes`` in ``cached`` and ``independent`` mode. Each runs in a fresh
  subprocess so that its peak memory is its own (resident set size above the process's size
  before the model was built on a CPU; ``max_memory_allocated`` on a GPU); ``--rounds`` rounds,
  interleaved, and the median of the rounds' median steps.

Views are fixed random tensors on the device: only the step is timed.

Usage: python bench/train_step.py [--device cpu|cuda] [--batch 256] [--passes 4] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from host import host_kind

ACCUMULATION = {"one_pass": (1, "cached"), "cached": (0, "cached"), "independent": (0, "independent")}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _trainers(device_name: str, modes: list[str], overrides: list[str]) -> tuple[list[Any], Any]:
    """Trainers sharing one model and optimiser, one per step-guard mode, for
    :func:`twinview.pretrain.engine.train.train_step` (the real step)."""
    import torch
    from accelerate import Accelerator

    from twinview.pretrain.config import load_config
    from twinview.pretrain.engine.checkpoints import Progress
    from twinview.pretrain.engine.optim import build_optimizer, build_scheduler
    from twinview.pretrain.engine.step_guard import StepGuard
    from twinview.pretrain.engine.train import Trainer
    from twinview.pretrain.models import create_model
    from twinview.pretrain.objectives.methods import create_method

    cfg = load_config("simclr-cifar10", ["data.path=unused", *overrides])
    accelerator = Accelerator(cpu=device_name == "cpu")
    torch.manual_seed(0)
    model = create_model(cfg.model).to(memory_format=torch.channels_last)
    method = create_method(cfg, model).to(accelerator.device)
    optimizer = build_optimizer(cfg, model, cfg.optim.lr, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(cfg, optimizer, cfg.optim.lr, 1000)
    trainers = []
    for mode in modes:
        guard = StepGuard(model, method, optimizer, mode, accelerator.device)
        trainers.append(
            Trainer(
                cfg,
                accelerator,
                model,
                model,
                method,
                optimizer,
                scheduler,
                guard,
                Progress(guard=guard),
                1000 * cfg.train.epochs,
                list(model.parameters()),
                passes=cfg.train.grad_accumulation,
                cached=cfg.train.grad_accumulation > 1 and cfg.train.grad_accumulation_mode == "cached",
            )
        )
    return trainers, accelerator.device


def _passes(batch: int, passes: int, device: Any) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(batch // passes, dtype=torch.long, device=device)
    return [
        (
            [
                torch.randn(batch // passes, 3, 32, 32, generator=g)
                .to(device)
                .contiguous(memory_format=torch.channels_last)
                for _ in range(2)
            ],
            labels,
        )
        for _ in range(passes)
    ]


def _timed(step: Callable[[], Any], device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def guard_costs(device_name: str, batch: int, steps: int) -> dict:
    """off / sync / device guards around one model, their steps interleaved."""
    from twinview.pretrain.engine.train import train_step

    names = ["off", "sync", "device"]
    trainers, device = _trainers(device_name, names, ["train.max_nonfinite_steps=5"])
    passes = _passes(batch, 1, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps + 1):
        for j in [*range(i % 3, 3), *range(i % 3)]:  # rotate the order every round
            t = _timed(partial(train_step, trainers[j], passes), device)
            if i > 0:
                times[names[j]].append(t)
    off = statistics.median(times["off"])
    parameters = trainers[0].parameters
    shadow_mb = sum(t.numel() * t.element_size() for t in trainers[2].guard.shadow) / 2**20
    params_mb = sum(p.numel() * p.element_size() for p in parameters) / 2**20
    out: dict[str, Any] = {
        name: {"step_ms": 1000 * statistics.median(ts), "vs_off": statistics.median(ts) / off}
        for name, ts in times.items()
    }
    out["device"]["extra_memory_mb"] = shadow_mb
    out["parameters_mb"] = params_mb
    return out


def accumulation_one(name: str, device_name: str, batch: int, passes: int, steps: int) -> dict:
    """One accumulation configuration, timed in this process (a fresh one per call)."""
    import torch

    from twinview.pretrain.engine.train import train_step

    k, mode = ACCUMULATION[name]
    k = k or passes
    base = _rss_mb()
    (trainer,), device = _trainers(
        device_name, ["off"], [f"train.grad_accumulation={k}", f"train.grad_accumulation_mode={mode}"]
    )
    step_passes = _passes(batch, k, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    times = [_timed(lambda: train_step(trainer, step_passes), device) for _ in range(steps + 2)][2:]
    peak = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if device.type == "cuda" else _peak_rss_mb() - base
    return {"step_ms": 1000 * statistics.median(times), "peak_mb": peak, "passes": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(accumulation_one(args.one, args.device, args.batch, args.passes, args.steps)))
        return
    guard = guard_costs(args.device, args.batch, args.steps * 2)
    runs: dict[str, list[dict]] = {name: [] for name in ACCUMULATION}
    for _ in range(args.rounds):
        for name in ACCUMULATION:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    name,
                    "--device",
                    args.device,
                    "--batch",
                    str(args.batch),
                    "--passes",
                    str(args.passes),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    accumulation = {
        name: {
            "passes": r[0]["passes"],
            "step_ms": statistics.median(x["step_ms"] for x in r),
            "peak_mb": statistics.median(x["peak_mb"] for x in r),
        }
        for name, r in runs.items()
    }
    for name in ("cached", "independent"):
        accumulation[name]["time_vs_one_pass"] = accumulation[name]["step_ms"] / accumulation["one_pass"]["step_ms"]
        accumulation[name]["memory_vs_one_pass"] = accumulation[name]["peak_mb"] / accumulation["one_pass"]["peak_mb"]
    print(
        json.dumps(
            {
                "bench": "train_step",
                "device": args.device,
                "host": host_kind(),
                "batch": args.batch,
                "passes": args.passes,
                "rounds": args.rounds,
                "guard": guard,
                "accumulation": accumulation,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
