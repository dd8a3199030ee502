"""Every check of a run's settings, in one place, before any compute.

* :func:`validate` checks a config: values, choices, the objective's own checks (from the
  objective registry) and the loop's settings; given the :class:`World` (processes, device) also
  the batch shape, the precision and the tracker. ``load_config`` runs it without a world, the
  training loop with one, before it builds anything.
* :func:`validate` also refuses what the kind of ``data.path`` alone rules out, told from the path
  before anything is read; :func:`validate_data` checks the config against the resolved source
  (shards, images, labels, classes), before compute.
* :func:`validate_epoch` checks that an epoch holds at least one optimiser step
  (``run_start.check_view_sides``: that the backbone takes progressive resolution's view sides).

Each error names the key to change. This module imports no torch, so reading a config stays light.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twinview.augment.config import RECIPES
from twinview.pretrain.data.index import HF, SHARDS
from twinview.pretrain.data.source import source_kind
from twinview.pretrain.objectives import registry

if TYPE_CHECKING:  # config.py calls validate(); the reverse import is for types only
    from twinview.pretrain.config import Config
    from twinview.pretrain.data.source import Source


class ConfigError(ValueError):
    """A configuration key or value that is not valid; the message names it and the valid ones."""


@dataclass(frozen=True)
class World:
    """Where a run trains, as far as the checks care.

    Attributes:
        processes: Number of processes (``accelerate launch``).
        device_type: ``cpu``, ``cuda``, ``mps``, ...
        bf16_supported: Whether the device runs bf16 (CUDA: compute capability >= 8.0).
        device_name: For messages, e.g. ``Tesla V100``.
        bf16_native: Whether it computes bf16 in hardware (a CPU with AVX512-BF16 or AMX; on
            other CPUs bf16 is emulated and slower than fp32).
    """

    processes: int = 1
    device_type: str = "cpu"
    bf16_supported: bool = True
    device_name: str = ""
    bf16_native: bool = False


CHOICES: dict[str, tuple[str, ...]] = {
    "augment.recipe": tuple(RECIPES),
    "augment.backend": ("fast", "kornia"),
    "data.cache": ("none", "disk", "device"),
    "data.decode": ("cpu", "gpu"),
    "train.mixed_precision": ("no", "fp16", "bf16", "auto"),
    "train.log_with": ("none", "tensorboard", "wandb"),
    "train.nonfinite_check": ("auto", "sync", "device"),
    "train.resume": ("no", "auto"),
    "train.grad_accumulation_mode": ("cached", "independent"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
}

MIN_IMAGE_SIZE = 8
_AT_LEAST = {  # key: minimum, and what the minimum means
    "train.batch_size": (1, ""),
    "train.epochs": (1, " (a run of 0 epochs would save untrained weights)"),
    "train.max_steps_per_epoch": (0, " (0: no cap)"),
    "train.grad_accumulation": (1, " (1: no accumulation)"),
    "train.max_nonfinite_steps": (0, " (0: no check)"),
    "train.keep_checkpoints": (1, ""),
    "data.samples_per_class": (1, ""),
    "model.proj_layers": (1, ""),
}


def validate(cfg: Config, world: World | None = None) -> None:
    """Raises ConfigError for the first setting that cannot work.

    Args:
        cfg: The resolved config.
        world: Processes and device of the run; None checks only what needs neither.
    """
    _check_values(cfg)
    _check_progressive(cfg)
    _check_source_kind(cfg)
    _check_monitor(cfg)
    if world is None:
        return
    _check_views(cfg)
    _check_decode(cfg, world)
    _check_objective(cfg, world)
    _check_precision(cfg.train.mixed_precision, world)
    _check_tracker(cfg.train.log_with)


def _value(cfg: Config, dotted: str) -> object:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _check_values(cfg: Config) -> None:
    if not cfg.data.path:
        raise ConfigError(
            "data.path is not set: point it at a folder of images, e.g. data.path=/my/images "
            "(or data.path=builtin:digits for the embedded demo data set)."
        )
    objective = cfg.objective.name
    if objective not in registry.objectives():
        raise ConfigError(
            f"invalid value for 'objective.name': {objective!r}. Valid values: {', '.join(registry.objectives())}."
        )
    choices = dict(CHOICES)
    for entry in registry.objectives().values():
        if not hasattr(cfg.objective, entry.name):  # registered after this config was read: not in it
            continue
        choices.update({f"objective.{entry.name}.{key}": valid for key, valid in entry.choices})
    for key, valid in choices.items():
        *path, name = key.split(".")
        node: object = cfg
        for part in path:
            node = getattr(node, part)
        value = getattr(node, name)
        if value not in valid:
            raise ConfigError(f"invalid value for '{key}': {value!r}. Valid values: {', '.join(valid)}.")
    for key, (minimum, meaning) in _AT_LEAST.items():
        value = _value(cfg, key)
        assert isinstance(value, int)
        if value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}{meaning}.")
    if cfg.train.resume == "auto" and not cfg.train.run_name:
        raise ConfigError(
            "train.resume=auto needs train.run_name: a restarted or requeued job must find the same run "
            "directory, and an empty name means a new timestamp each start."
        )
    size = cfg.data.image_size
    if size != "auto" and not (isinstance(size, int) and size >= MIN_IMAGE_SIZE):
        raise ConfigError(
            f"invalid value for 'data.image_size': {size!r}. "
            f"Valid values: auto, or a side in pixels >= {MIN_IMAGE_SIZE}."
        )


def _check_progressive(cfg: Config) -> None:
    a = cfg.augment
    if a.progressive_multiple < 1:
        raise ConfigError(f"augment.progressive_multiple={a.progressive_multiple} must be >= 1.")
    first, last = a.progressive_ramp
    if not 0.0 <= first <= last <= 1.0:
        raise ConfigError(
            f"augment.progressive_ramp={list(a.progressive_ramp)} must be two fractions of train.epochs, "
            "0 <= start <= end <= 1."
        )
    if not a.progressive_min:
        return
    if a.progressive_min < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"augment.progressive_min={a.progressive_min} must be 0 (off) or a side in pixels >= {MIN_IMAGE_SIZE}."
        )
    full = a.crop_size or cfg.data.image_size
    if isinstance(full, int) and a.progressive_min >= full:
        raise ConfigError(
            f"augment.progressive_min={a.progressive_min} must be below the global views' full side, {full} px "
            f"(augment.crop_size, else data.image_size); 0 turns progressive resolution off."
        )


def _check_source_kind(cfg: Config) -> None:
    """What the kind of ``data.path`` alone rules out, told from the path before anything is read
    (so a hub data set is not downloaded to learn that a setting cannot work with it)."""
    d = cfg.data
    kind = source_kind(d.path)
    if kind not in (HF, SHARDS):
        return
    if d.cache != "none":
        raise ConfigError(
            "data.cache works with image folders and file lists; a Hugging Face source or tar shards "
            "are read by datasets, which keeps its own Arrow cache. Set data.cache=none."
        )
    if d.decode == "gpu":
        raise ConfigError(
            "data.decode=gpu reads image files; a Hugging Face source decodes its own images. Use data.decode=cpu."
        )
    if kind == SHARDS or d.streaming:
        streamed = "tar shards (always streamed)" if kind == SHARDS else "data.streaming=true"
        if not cfg.train.max_steps_per_epoch:
            raise ConfigError(f"{streamed} has no epoch length: set train.max_steps_per_epoch.")
        if registry.get(cfg.objective.name).supervised:
            raise ConfigError(
                f"objective.name={cfg.objective.name} needs P x K batches, which a streamed source "
                f"({streamed}) cannot give."
            )


def _check_monitor(cfg: Config) -> None:
    if cfg.eval.monitor_every and not (cfg.eval.monitor_train and cfg.eval.monitor_test):
        raise ConfigError("eval.monitor_every needs eval.monitor_train and eval.monitor_test (labelled folders).")


def _check_decode(cfg: Config, world: World) -> None:
    d = cfg.data
    if d.decode != "gpu":
        return
    if world.device_type != "cuda":
        raise ConfigError(
            f"data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device; this run trains on "
            f"'{world.device_type}'. Use data.decode=cpu."
        )
    if d.cache != "none":
        raise ConfigError(
            f"data.decode=gpu decodes every epoch; data.cache={d.cache} decodes once on the CPU. "
            "Use one of them (data.cache=none or data.decode=cpu)."
        )


def _check_views(cfg: Config) -> None:
    # A training check only: `twinview preview` shows multi-crop views of any config.
    if cfg.augment.local_crops and not registry.get(cfg.objective.name).multi_crop:
        takes = ", ".join(o.name for o in registry.objectives().values() if o.multi_crop)
        raise ConfigError(
            f"augment.local_crops={cfg.augment.local_crops}: objective '{cfg.objective.name}' uses two views "
            f"and no multi-crop local views; set augment.local_crops=0 (multi-crop: {takes})."
        )


def batch_shape(cfg: Config, world: World) -> registry.BatchShape:
    """The batch shape the objective's checks see."""
    return registry.BatchShape(
        cfg.train.batch_size, world.processes, cfg.train.grad_accumulation, cfg.train.grad_accumulation_mode == "cached"
    )


def _check_objective(cfg: Config, world: World) -> None:
    entry = registry.get(cfg.objective.name)
    section = getattr(cfg.objective, entry.name)
    for check in entry.checks:
        try:
            check(section, batch_shape(cfg, world))
        except registry.ObjectiveSettingError as err:
            raise ConfigError(str(err)) from None


def _check_precision(precision: str, world: World) -> None:
    if precision == "fp16" and world.device_type == "cpu":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported on a CPU (no fp16 loss scaling there, and fp16 matmuls "
            "are slow); use train.mixed_precision=bf16 or no."
        )
    if precision == "bf16" and world.device_type == "cuda" and not world.bf16_supported:
        raise ConfigError(
            f"train.mixed_precision=bf16 is not supported by {world.device_name} (bf16 needs compute "
            "capability >= 8.0, e.g. A100/H100); use train.mixed_precision=fp16 or no."
        )


def _check_tracker(name: str) -> None:
    if name != "none" and importlib.util.find_spec(name) is None:
        raise ConfigError(f"train.log_with={name} needs the '{name}' package: pip install {name}")


def validate_data(cfg: Config, world: World, source: Source) -> None:
    """Raises ConfigError when the config cannot train on the resolved source: fewer shards than
    processes, fewer images than a batch, or labels and classes an objective needs and the data
    lacks. (What the kind of source alone rules out, :func:`validate` refuses before it is read.)"""
    _check_shards(world, source)
    found = source.survey
    if found is None or found.images is None:  # a stream is not counted
        return
    global_batch = cfg.train.batch_size * world.processes
    if found.images < global_batch:
        raise ConfigError(
            f"'{source.path}' has {found.images} images, fewer than one global batch of {global_batch} "
            f"(train.batch_size={cfg.train.batch_size} x {world.processes} processes). Lower train.batch_size."
        )
    if not registry.get(cfg.objective.name).supervised:
        return
    if not found.classes:
        raise ConfigError(
            f"objective.name={cfg.objective.name} trains on labels, but '{source.path}' has no class "
            "sub-folders. Use a folder with one sub-folder per class, or a self-supervised objective."
        )
    k = cfg.data.samples_per_class
    if cfg.train.batch_size % k:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of data.samples_per_class={k}.")
    p = cfg.train.batch_size // k
    if p < 2:
        raise ConfigError(
            f"P x K batches of train.batch_size={cfg.train.batch_size} with data.samples_per_class={k} hold one "
            "class: there would be no negatives. Use at least 2 classes per batch."
        )
    if p > found.classes:
        raise ConfigError(
            f"a P x K batch needs {p} classes but the data has {found.classes} with images; "
            f"lower train.batch_size or raise data.samples_per_class."
        )


def _check_shards(world: World, source: Source) -> None:
    if source.shards and len(source.shards) < world.processes:
        raise ConfigError(
            f"data.path names {len(source.shards)} shards for {world.processes} processes; each process reads whole "
            "shards. Write at least one shard per process (more, for the DataLoader workers: data.num_workers)."
        )


def validate_epoch(cfg: Config, batches_per_process: int) -> None:
    """Raises ConfigError when an epoch would hold no optimiser step."""
    if batches_per_process < cfg.train.grad_accumulation:
        raise ConfigError(
            f"train.grad_accumulation={cfg.train.grad_accumulation} needs at least that many batches per process "
            f"and epoch; there are {batches_per_process}. Lower train.grad_accumulation or train.batch_size."
        )
