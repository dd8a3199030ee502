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
import statistics
import time

import torch
from host import host_kind
from simclr_step import simclr_step  # bench/ is on the path of a bench script


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
    steps = {
        name: simclr_step(args.overrides, device, args.batch, args.size, compile=name == "compiled", recipe=args.recipe)
        for name in ("eager", "compiled")
    }

    def step(name: str) -> float:
        _synced(device)
        start = time.perf_counter()
        steps[name]()
        _synced(device)
        return time.perf_counter() - start

    first = {name: step(name) for name in steps}  # the compiled model compiles here
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            times[name].append(step(name))
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    gain = eager - compiled
    print(
        json.dumps(
            {
                "bench": "compile",
                "host": host_kind(),
                "device": args.device,
                "torch": torch.__version__,
                "recipe": args.recipe,
                "overrides": args.overrides,
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
