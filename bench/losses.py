"""Forward+backward time and peak memory of NT-Xent and SupCon, batch 256..8192, dim 128.

Each (loss, batch) runs in a fresh subprocess so that its peak memory is its own: on a CPU the
peak resident set size above the process's size before the inputs were made, on a GPU
``torch.cuda.max_memory_allocated``. Batch N means N images with two views each, so the similarity
matrix is (2N) x (2N): ``sim_matrix_mb`` is its float32 size, the yardstick for "O(N^2) floats and no
N x N x D intermediates". Time is the median of ``--repeats`` passes after one warm-up.

Usage: python bench/losses.py [--batches 256 512 ... 8192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from host import host_kind

DIM = 128


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(loss_name: str, n: int, device: str, repeats: int) -> dict:
    """Times one loss at one batch size in this process and measures its peak memory."""
    import torch

    from twinview.pretrain.objectives.losses import nt_xent, supcon

    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(n, DIM, generator=g).to(device).requires_grad_()
    z_b = torch.randn(n, DIM, generator=g).to(device).requires_grad_()
    labels = (torch.arange(n) % 100).to(device)  # 100 classes, as a supervised batch might have

    def step() -> None:
        if loss_name == "nt_xent":
            loss = nt_xent(z_a, z_b, 0.2)
        else:
            loss = supcon(torch.cat([z_a, z_b]), labels.repeat(2), 0.1)
        loss.backward()
        z_a.grad = z_b.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    step()  # warm-up; also the first peak
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (
        (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    )
    sim = (2 * n) ** 2 * 4 / 2**20
    return {
        "loss": loss_name,
        "batch": n,
        "views": 2 * n,
        "fwd_bwd_ms": 1000 * statistics.median(times),
        "peak_mb": peak,
        "sim_matrix_mb": sim,
        "peak_over_sim_matrix": peak / sim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--losses", nargs="+", default=["nt_xent", "supcon"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("LOSS", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.device, args.repeats)))
        return
    results = []
    for loss_name in args.losses:
        for n in args.batches:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                loss_name,
                str(n),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    import torch

    print(
        json.dumps(
            {
                "benchmark": "losses",
                "machine": f"{host_kind()}, torch {torch.__version__}, device={args.device}",
                "dim": DIM,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
