"""Weight+input gradient of small-output convolutions: PyTorch's CPU kernels vs twinview's fast path.

For every 3x3 convolution shape of a ResNet-18 at 32x32 px (batch 512 = 2 views x 256), times
forward+backward with ``nn.Conv2d`` and with :class:`twinview.pretrain.cpu_conv.SmallOutputConv2d`,
interleaved, and reports medians and their ratio; then the same for a whole ResNet-18 forward +
backward. Prints one JSON object.

Usage: python bench/cpu_conv.py [--batch 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from twinview.pretrain.cpu_conv import MAX_OUTPUT_PIXELS, SmallOutputConv2d

# (in_channels, out_channels, input side, stride) of ResNet-18's 3x3 convs at 32 px input.
SHAPES = [(64, 64, 8, 1), (64, 128, 8, 2), (128, 128, 4, 1), (128, 256, 4, 2), (256, 256, 2, 1),
          (256, 512, 2, 2), (512, 512, 1, 1)]


def _time(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    conv(x).backward(grad)
    return time.perf_counter() - start


def whole_model(batch: int, repeats: int) -> dict[str, float]:
    """Forward+backward of ResNet-18 + projection head on ``batch`` 32 px views, both ways, interleaved."""
    import timm

    from twinview.pretrain.cpu_conv import patch_model

    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=0).to(memory_format=torch.channels_last)
    fast = timm.create_model("resnet18", num_classes=0).to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    patch_model(fast)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"pytorch": [], "twinview": []}
    for _ in range(repeats + 1):
        for name, model in (("pytorch", ref), ("twinview", fast)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(x).square().mean().backward()
            times[name].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    return {"pytorch_ms": round(ms["pytorch"], 1), "twinview_ms": round(ms["twinview"], 1),
            "speedup": round(ms["pytorch"] / ms["twinview"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for cin, cout, side, stride in SHAPES:
        torch.manual_seed(0)
        ref = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
        fast = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
        fast.load_state_dict(ref.state_dict())
        fast.__class__ = SmallOutputConv2d
        x = torch.randn(args.batch, cin, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn_like(ref(x))
        times: dict[str, list[float]] = {"pytorch": [], "twinview": []}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, conv in (("pytorch", ref), ("twinview", fast)):
                times[name].append(_time(conv, x, grad))
        ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
        out_side = (side + 2 - 3) // stride + 1
        rows.append({
            "shape": f"{cin}->{cout} {side}x{side} s{stride}",
            "output_pixels": out_side * out_side,
            "fast_path": out_side * out_side <= MAX_OUTPUT_PIXELS,
            "pytorch_ms": round(ms["pytorch"], 2),
            "twinview_ms": round(ms["twinview"], 2),
            "speedup": round(ms["pytorch"] / ms["twinview"], 2),
        })
    print(json.dumps({"benchmark": "cpu_conv_fwd_bwd", "batch": args.batch, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows,
                      "resnet18_fwd_bwd_32px": whole_model(args.batch, args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
