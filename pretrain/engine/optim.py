"""The optimiser (timm's factory) and the per-step learning-rate schedule (timm's cosine)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from twinview.pretrain.config import Config


def scaled_lr(cfg: Config, num_processes: int) -> float:
    """``optim.lr`` scaled by the global batch of an optimiser step (``optim.lr_scaling``)."""
    ratio = cfg.train.batch_size * num_processes * cfg.train.grad_accumulation / cfg.optim.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.lr_scaling]
    return cfg.optim.lr * factor


def build_optimizer(
    cfg: Config, model: torch.nn.Module, lr: float, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """``optim.name`` from timm's factory (sgd, lars, adamw, ...); norms and biases get no weight decay.

    On a GPU torch's Adam family is built ``capturable``: its step count then lives on the GPU
    (not read on the host each step), which the non-finite check's device mode needs.
    """
    extra: dict[str, Any] = (
        {"capturable": True} if device is not None and device.type == "cuda" and cfg.optim.name in _CAPTURABLE else {}
    )
    return create_optimizer_v2(
        model,
        opt=cfg.optim.name,
        lr=lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        filter_bias_and_bn=True,
        **extra,
    )


_CAPTURABLE = ("adam", "adamw", "nadam", "radam")  # timm builds these with torch.optim's classes


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, peak_lr: float, steps_per_epoch: int
) -> CosineLRScheduler:
    """Linear warm-up over ``optim.warmup_epochs``, then cosine decay to ``optim.min_lr``, per step."""
    total_steps = steps_per_epoch * cfg.train.epochs
    return cosine_schedule(
        optimizer, peak_lr, total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.min_lr
    )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> CosineLRScheduler:
    """timm's per-step cosine schedule: linear warm-up from ``peak_lr / 1000`` over ``warmup_steps``
    (at most ``total_steps - 1``), then cosine decay to ``min_lr`` at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    # timm warns that a decay of one step "will have no effect"; in a run that short it is meant
    with _quiet_logger("timm.scheduler.cosine_lr"):
        return CosineLRScheduler(
            optimizer,
            t_initial=max(total_steps - warmup_steps, 1),
            lr_min=min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=peak_lr * 1e-3,
            warmup_prefix=True,
            t_in_epochs=False,
        )


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silences a library logger below ERROR for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
