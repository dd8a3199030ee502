"""The start of a run: the data surveyed, ``data.image_size=auto`` resolved, and one block a person
can check (data, recipe, model, batch, learning rate, steps, devices) with warnings about settings
that do not suit the data, each naming the setting to change."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from twinview.pretrain.config import Config
from twinview.pretrain.data.survey import DataSurvey, auto_image_size, survey
from twinview.pretrain.models import ContrastiveModel
from twinview.pretrain.validate import World

FEW_STEPS = 10  # fewer optimiser steps per epoch than this: warn
UPSCALE = 2.0  # images this many times smaller than data.image_size: warn


@dataclasses.dataclass(frozen=True)
class StartInfo:
    """What the run start found: the survey and how the image size was chosen."""

    found: DataSurvey
    size_note: str
    precision_note: str = ""


def survey_and_size(cfg: Config) -> tuple[Config, StartInfo]:
    """Surveys the data and resolves ``data.image_size=auto`` (the config returned has pixels)."""
    found = survey(cfg.data.path, cfg.data.split, cfg.data.streaming)  # a stream is not downloaded whole
    if cfg.data.image_size != "auto":
        return cfg, StartInfo(found, f"{cfg.data.image_size} px (data.image_size)")
    size, why = auto_image_size(found)
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    return resolved, StartInfo(found, f"{size} px (data.image_size=auto: {why})")


def resolve_precision(cfg: Config, world: World, info: StartInfo) -> tuple[Config, StartInfo]:
    """Resolves ``train.mixed_precision=auto`` for the device (the config returned has the choice).

    bf16 where the device computes it natively (a CUDA GPU of compute capability >= 8.0, a CPU with
    AVX512-BF16 or AMX), fp16 on older CUDA GPUs, otherwise no mixed precision.
    """
    chosen = cfg.train.mixed_precision
    if chosen != "auto":
        return cfg, dataclasses.replace(info, precision_note=f"{chosen} (train.mixed_precision)")
    if world.device_type == "cuda":
        chosen, why = ("bf16", "the GPU computes bf16") if world.bf16_supported else ("fp16", "no bf16 on this GPU")
    elif world.device_type == "cpu" and world.bf16_native:
        chosen, why = "bf16", "this CPU has bf16 instructions (AVX512-BF16 or AMX)"
    else:
        chosen, why = "no", f"no native bf16 on this {world.device_type}"
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=chosen))
    return resolved, dataclasses.replace(info, precision_note=f"{chosen} (train.mixed_precision=auto: {why})")


def start_block(
    cfg: Config,
    info: StartInfo,
    recipe: str,
    model: nn.Module,
    world: World,
    peak_lr: float,
    steps_per_epoch: int,
) -> str:
    """The lines printed before the first step."""
    processes, passes = world.processes, cfg.train.grad_accumulation
    global_batch = cfg.train.batch_size * processes * passes
    params = sum(p.numel() for p in model.parameters())
    scaling = (
        "" if cfg.optim.lr_scaling == "none" else f" ({cfg.optim.lr_scaling} scaling of optim.lr={cfg.optim.lr:g})"
    )
    rows = [
        ("data", f"{cfg.data.path}: {info.found.describe()}"),
        ("image size", info.size_note),
        ("recipe", recipe or "defaults"),
        ("model", f"{cfg.model.backbone} + head, {params / 1e6:.1f} M parameters; objective {cfg.objective.name}"),
        (
            "batch",
            f"{global_batch} global = {cfg.train.batch_size} per process x {processes} process(es) x {passes} pass(es)",
        ),
        ("lr", f"{peak_lr:.4g} peak{scaling}; {cfg.optim.name}, warm-up {cfg.optim.warmup_epochs:g} epoch(s), cosine"),
        ("steps", f"{steps_per_epoch} per epoch x {cfg.train.epochs} epochs = {steps_per_epoch * cfg.train.epochs}"),
        (
            "device",
            f"{world.device_name or world.device_type} x {processes}, "
            f"precision {info.precision_note or cfg.train.mixed_precision}",
        ),
    ]
    return "\n".join(f"  {name:<11}{text}" for name, text in rows)


def print_start(
    accelerator: Any,
    cfg: Config,
    info: StartInfo,
    recipe: str,
    model: ContrastiveModel,
    world: World,
    peak_lr: float,
    steps_per_epoch: int,
) -> None:
    """Prints the start block and the warnings (once, on the main process)."""
    accelerator.print(start_block(cfg, info, recipe, model, world, peak_lr, steps_per_epoch))
    for warning in start_warnings(cfg, info, model.backbone, steps_per_epoch):
        accelerator.print(f"warning: {warning}")


def start_warnings(cfg: Config, info: StartInfo, backbone: nn.Module, steps_per_epoch: int) -> list[str]:
    """Settings that do not suit the data, each with the setting to change."""
    out = []
    size, found = cfg.data.size, info.found
    if steps_per_epoch < FEW_STEPS and found.images is not None:
        out.append(
            f"an epoch of {found.images} images is only {steps_per_epoch} optimiser step(s) at "
            f"train.batch_size={cfg.train.batch_size}: lower train.batch_size (or train on more images)."
        )
    if found.shorter_sides and found.median_side * UPSCALE <= size:
        out.append(
            f"the images (median shorter side {found.median_side:.0f} px) are upscaled to data.image_size={size}: "
            f"set data.image_size=auto or a size near theirs."
        )
    side = final_feature_side(backbone, size)
    if side == 1:
        stem = " or model.cifar_stem=true (a stride-1 stem for small images)" if hasattr(backbone, "maxpool") else ""
        out.append(f"{cfg.model.backbone} reduces {size} px images to 1x1 before pooling: raise data.image_size{stem}.")
    return out


def final_feature_side(backbone: nn.Module, size: int) -> int | None:
    """Side of the backbone's last feature map at ``size`` px (None for token models such as ViTs)."""
    forward_features = getattr(backbone, "forward_features", None)
    if forward_features is None:
        return None
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            features = forward_features(torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
    except Exception:  # a model that takes no such input: no warning
        return None
    finally:
        backbone.train(was_training)
    return int(features.shape[-1]) if features.dim() == 4 else None
