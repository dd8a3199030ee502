"""``train.compile``: compile time and steady-state step time against eager, on one model.

Two copies of the same model (``--recipe``, default the shipped SimCLR CIFAR recipe: ResNet-18,
LARS) take full training steps (forward, loss, backward, optimiser) on fixed random views at
``--size`` px; the first compiled step is timed as the compile cost, then ``--steps`` steps of
each are interleaved and their medians reported, with the number of steps after which compiling
has paid for itself.

Usage: python bench/compile.py [--device cpu|cuda] [--batch 256] [--size 32] [--steps 10] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.optim import build_optimizer
from twinview.pretrain.models import create_model
from twinview.pretrain.objectives.methods import create_method


def _synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="simclr-cifar10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.recipe, ["data.path=unused", *args.overrides])
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device) for _ in range(2)]
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    runs: dict[str, Any] = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = create_model(cfg.model).to(device, memory_format=torch.channels_last)
        method = create_method(cfg, model).to(device)
        if name == "compiled":
            model.compile()
        runs[name] = (model, method, build_optimizer(cfg, model, cfg.optim.lr, device))

    def step(name: str) -> float:
        model, method, optimizer = runs[name]
        _synced(device)
        start = time.perf_counter()
        loss, _ = method(model, views, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synced(device)
        return time.perf_counter() - start

    first = {name: step(name) for name in runs}  # the compiled model compiles here
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            times[name].append(step(name))
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    gain = eager - compiled
    print(
        json.dumps(
            {
                "bench": "compile",
                "host": platform.processor() or platform.machine(),
                "device": args.device,
                "torch": torch.__version__,
                "recipe": args.recipe,
                "backbone": cfg.model.backbone,
                "batch": args.batch,
                "size": args.size,
                "first_step_s": first,
                "compile_s": first["compiled"] - eager,
                "step_ms": {"eager": 1000 * eager, "compiled": 1000 * compiled},
                "speedup": eager / compiled,
                "steps_to_break_even": (first["compiled"] - eager) / gain if gain > 0 else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
