"""The start of a run: ``train.mixed_precision=auto`` resolved, and one block a person can check
(data found, image size and why, recipe, model, batch, learning rate, steps, devices) with warnings
about settings that do not suit the data, each naming the setting to change."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinview.evaluate.progress import human_duration
from twinview.pretrain.config import Config, load_config
from twinview.pretrain.data.source import ImageSize, Source
from twinview.pretrain.data.survey import AUTO_MIN, AUTO_STEP
from twinview.pretrain.models import ContrastiveModel
from twinview.pretrain.validate import ConfigError, World

FEW_STEPS = 10  # fewer optimiser steps per epoch than this: warn
UPSCALE = 2.0  # images this many times smaller than data.image_size: warn
LONG_RUN_S = 3600.0  # a CPU run estimated longer than this: the estimate names cheaper choices
PHOTO_RECIPE = "moco-v2-photos"  # the recipe for photos on small compute (README)


@dataclasses.dataclass(frozen=True)
class StartInfo:
    """What the run start found: the source and how the image size and precision were chosen."""

    source: Source
    size: ImageSize
    precision_note: str = ""
    resolution_note: str = ""  # progressive resolution's schedule ("" when off)


def resolve_precision(cfg: Config, world: World) -> tuple[Config, str]:
    """Resolves ``train.mixed_precision=auto`` for the device (the config returned has the choice).

    bf16 where the device computes it natively (a CUDA GPU of compute capability >= 8.0, a CPU with
    AVX512-BF16 or AMX), fp16 on older CUDA GPUs, otherwise no mixed precision.

    Returns:
        The config, and a note of the choice and why, for the start block.
    """
    chosen = cfg.train.mixed_precision
    if chosen != "auto":
        return cfg, f"{chosen} (train.mixed_precision)"
    if world.device_type == "cuda":
        chosen, why = ("bf16", "the GPU computes bf16") if world.bf16_supported else ("fp16", "no bf16 on this GPU")
    elif world.device_type == "cpu" and world.bf16_native:
        chosen, why = "bf16", "this CPU has bf16 instructions (AVX512-BF16 or AMX)"
    else:
        chosen, why = "no", f"no native bf16 on this {world.device_type}"
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=chosen))
    return resolved, f"{chosen} (train.mixed_precision=auto: {why})"


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
        ("data", f"{info.source.path}: {info.source.survey.describe() if info.source.survey else info.source.kind}"),
        ("image size", info.size.note),
        ("recipe", recipe or "defaults"),
        *([("views", f"progressive: {info.resolution_note}")] if info.resolution_note else []),
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
    for warning in start_warnings(cfg, info, model.backbone, steps_per_epoch, recipe):
        accelerator.print(f"warning: {warning}")


def start_warnings(
    cfg: Config, info: StartInfo, backbone: nn.Module, steps_per_epoch: int, recipe: str = ""
) -> list[str]:
    """Settings that do not suit the data, each with the setting to change.

    The backbone's final feature map is only checked when the image size was not chosen by a
    recipe (``data.image_size=auto``, or no recipe): a recipe such as the demo's or simclr-cifar10
    keeps the standard ResNet stem at 32 px on purpose, for speed.
    """
    out: list[str] = []
    size, found = cfg.data.size, info.source.survey
    if found is None:
        return out
    capped = steps_per_epoch == cfg.train.max_steps_per_epoch  # the user chose the length of an epoch
    if steps_per_epoch < FEW_STEPS and found.images is not None and not capped:
        out.append(
            f"an epoch of {found.images} images is only {steps_per_epoch} optimiser step(s) at "
            f"train.batch_size={cfg.train.batch_size}: lower train.batch_size (or train on more images)."
        )
    if found.shorter_sides and found.median_side * UPSCALE <= size:
        out.append(
            f"the images (median shorter side {found.median_side:.0f} px) are upscaled to data.image_size={size}: "
            f"set data.image_size=auto or a size near theirs."
        )
    side = final_feature_side(backbone, size) if info.size.auto or not recipe else None
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


def check_view_sides(backbone: nn.Module, sides: list[int]) -> None:
    """Raises ConfigError when the backbone cannot take views of one of ``sides`` px (progressive
    resolution: a timm ViT without ``dynamic_img_size``, patches that do not divide a side, a model
    with fixed windows); a forward of one blank image per side, before training."""
    was_training = backbone.training
    device = next(backbone.parameters()).device
    try:
        backbone.eval()
        for side in sides:
            try:
                with torch.no_grad():
                    backbone(torch.zeros(1, 3, side, side, device=device))
            except Exception as err:  # any failure means the side cannot be trained
                hint = (
                    "set model.kwargs.dynamic_img_size=true (timm ViTs; and a progressive_multiple the patch "
                    "size divides) or "
                    if hasattr(backbone, "patch_embed")
                    else ""
                )
                raise ConfigError(
                    f"augment.progressive_min: the backbone cannot take the {side} px views of the schedule "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {hint}"
                    "set augment.progressive_min=0."
                ) from err
    finally:
        backbone.train(was_training)


def estimate_lines(
    cfg: Config,
    world: World,
    recipe: str,
    steps_per_epoch: int,
    steps_left: int,
    images_per_step: int,
    per_step: float,
    timed_side: int = 0,
) -> list[str]:
    """The run's estimated time from the time of one step, and on a CPU where that is long, the
    cheaper choices with theirs.

    Args:
        cfg: The run's config.
        world: Its processes and device.
        recipe: The recipe it came from.
        steps_per_epoch: Optimiser steps per epoch.
        steps_left: Steps still to run (all of them, unless resumed).
        images_per_step: The global batch.
        per_step: Seconds per optimiser step, as measured.
        timed_side: Under progressive resolution, the view side the step was timed at (0: none).
    """
    total = per_step * steps_left
    whole = steps_left == steps_per_epoch * cfg.train.epochs
    epochs = f"{cfg.train.epochs} epoch" + ("s" if cfg.train.epochs != 1 else "")
    what = f"for {epochs}" if whole else f"for the {steps_left} steps left"
    lines = [
        f"  estimate   {human_duration(total)} {what} ({per_step * steps_per_epoch:.0f} s per epoch, "
        f"{per_step:.2f} s per step, {images_per_step / per_step:.0f} images/s)"
        + (f"; timed at {timed_side} px views, the larger views later cost more" if timed_side else "")
    ]
    if world.device_type != "cpu" or total < LONG_RUN_S or timed_side:
        return lines
    choices = cheaper_choices(cfg, recipe)
    if choices:
        lines.append("  cheaper    that is long for a CPU; the same epochs, scaled by the views' area:")
        lines += [
            f"             {choice:<26} about {human_duration(total * ratio)}{note}" for choice, ratio, note in choices
        ]
    return lines


def cheaper_choices(cfg: Config, recipe: str) -> list[tuple[str, float, str]]:
    """Cheaper settings for the same data and epochs: a smaller ``data.image_size``, and the photo
    recipe, each with the ratio of its views' area to this run's. A step's time on a CPU follows the
    pixels it computes on; measured, the cheaper choices took 0.72-0.79 of the time so predicted
    (docs/BENCHMARKS.md, "Time estimates"), so the estimates err on the long side."""
    view = cfg.augment.crop_size or cfg.data.size
    out = []
    smaller = (cfg.data.size // 2) // AUTO_STEP * AUTO_STEP
    if not cfg.augment.crop_size and smaller >= AUTO_MIN:  # the views follow the images' size
        out.append((f"data.image_size={smaller}", (smaller / view) ** 2, ""))
    if Path(recipe).stem != PHOTO_RECIPE:
        photo = load_config(PHOTO_RECIPE, ["data.path=unused"])
        photo_view = photo.augment.crop_size or int(photo.data.image_size)
        if view > photo_view:
            loaded = photo.data.image_size
            note = f" ({loaded} px images, {photo_view} px views, {photo.objective.name})"
            out.append((f"--config {PHOTO_RECIPE}", (photo_view / view) ** 2, note))
    return out
