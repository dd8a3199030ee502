"""One full SimCLR training step on fixed random views, for the benchmarks (compile.py, gpu_check.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.optim import build_optimizer
from twinview.pretrain.models import create_model
from twinview.pretrain.objectives.methods import create_method


def simclr_step(
    overrides: Sequence[str],
    device: torch.device,
    batch: int,
    size: int,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    recipe: str = "simclr-cifar10",
) -> Callable[[], None]:
    """``step()``: forward of both views, the recipe's loss, backward and optimiser step (autocast to
    ``dtype`` when it is not float32); the model compiled in place when asked."""
    cfg = load_config(recipe, ["data.path=unused", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device, memory_format=torch.channels_last)
    method = create_method(cfg, model).to(device)
    if compile:
        model.compile()
    optimizer = build_optimizer(cfg, model, cfg.optim.lr, device)
    g = torch.Generator().manual_seed(0)
    views = [
        torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = method(model, views, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
