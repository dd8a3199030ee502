"""The pretraining loop: HF Accelerate on one CPU, one GPU or many processes.

Per optimiser step: ``train.grad_accumulation`` uint8 batches arrive on the device, the views are
made there (twinview.augment), the method (twinview.pretrain.objectives.methods: SimCLR, MoCo v2/v3 or a
supervised metric loss) computes the loss, backward; then the optimiser step and the method's own
update (the MoCo momentum encoder), both skipped when the loss or gradient is not finite
(twinview.pretrain.engine.step_guard). Loss, gradient norm and counters are summed on the device and read
back every ``train.log_every`` steps, the loop's host synchronisation (on accelerators the only
one; on a CPU, where it is free, the finite check also reads its flag every step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from twinview.augment.views import build_views
from twinview.pretrain.engine.accumulation import Accumulator
from twinview.pretrain.config import Config, as_dict, save_config
from twinview.pretrain.data.cache import CachedDataset, DeviceBatches, batched_collate, build_or_load
from twinview.pretrain.distributed import all_reduce_min, use_cpu
from twinview.pretrain.data.sources import ImageFolderDataset, SkipLog, scan_source, worker_init
from twinview.pretrain.data.hf import HFImageDataset, HFStreamingDataset, is_hf_source
from twinview.pretrain.objectives.methods import SUPERVISED, create_method
from twinview.pretrain.models import create_model, normalization_stats
from twinview.pretrain.data.pk_sampler import PKBatchSampler
from twinview.pretrain.engine.monitor import monitor_knn
from twinview.pretrain.engine.step_guard import NonFiniteTraining, StepGuard, grad_norm, resolve_mode
from twinview.pretrain.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    checkpoint_path,
    checkpoints,
    save_weights,
)

SKIPPED_FILE = "skipped_files.txt"


@dataclass
class Progress:
    """Completed epochs and optimiser steps, and the non-finite step counters; saved with every
    checkpoint. The counters ride here rather than as their own checkpointed object, so a run
    resumes whether or not the check was on when it was saved."""

    epoch: int = 0
    step: int = 0
    guard: StepGuard | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        if self.guard is not None:
            state["nonfinite"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.guard is not None and "nonfinite" in state:
            self.guard.load_state_dict(state["nonfinite"])


class MetricsLog:
    """Appends JSON lines to ``RUN_DIR/metrics.jsonl`` (main process only), and the numbers to the
    Accelerate trackers when there are any."""

    def __init__(self, path: Path, enabled: bool, accelerator: Accelerator | None = None) -> None:
        self.path, self.enabled, self.accelerator = path, enabled, accelerator

    def drop_after(self, step: int) -> None:
        """Forgets records of steps after ``step``: a resumed run redoes them (e.g. after kill -9)."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
            if len(kept) < len(lines):
                self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and "step" in record:
            numbers = {f"{record['kind']}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.accelerator.log(numbers, step=int(record["step"]))


def scaled_lr(cfg: Config, num_processes: int) -> float:
    """``optim.lr`` scaled by the global batch of an optimiser step (``optim.lr_scaling``)."""
    ratio = cfg.train.batch_size * num_processes * cfg.train.grad_accumulation / cfg.optim.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.lr_scaling]
    return cfg.optim.lr * factor


def build_optimizer(cfg: Config, model: torch.nn.Module, lr: float, device: torch.device | None = None) -> torch.optim.Optimizer:
    """``optim.name`` from timm's factory (sgd, lars, adamw, ...); norms and biases get no weight decay.

    On a GPU torch's Adam family is built ``capturable``: its step count then lives on the GPU
    (not read on the host each step), which the non-finite check's device mode needs.
    """
    extra = {"capturable": True} if device is not None and device.type == "cuda" and cfg.optim.name in _CAPTURABLE else {}
    return create_optimizer_v2(model, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay,
                               momentum=cfg.optim.momentum, filter_bias_and_bn=True, **extra)


_CAPTURABLE = ("adam", "adamw", "nadam", "radam")  # timm builds these with torch.optim's classes


def _check_tracker(name: str) -> None:
    """Fails before any compute when the tracker's package is missing."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    try:
        __import__(module)
    except ImportError:
        raise ValueError(f"train.log_with={name} needs the '{module}' package: pip install {module}") from None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat ``section.key`` scalars (trackers take flat hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _pk_sampler(cfg: Config, dataset: Any, num_processes: int) -> PKBatchSampler | None:
    """Checks the data against the batch settings; the P x K sampler for the supervised objectives."""
    global_batch = cfg.train.batch_size * num_processes
    if len(dataset) < global_batch:
        raise ValueError(
            f"'{dataset.index.root}' has {len(dataset)} images, fewer than one global batch of {global_batch} "
            f"(train.batch_size={cfg.train.batch_size} x {num_processes} processes). Lower train.batch_size."
        )
    if cfg.objective.name not in SUPERVISED:
        return None
    if not dataset.index.labeled:
        raise ValueError(
            f"objective.name={cfg.objective.name} trains on labels, but '{dataset.index.root}' has no class "
            "sub-folders. Use a folder with one sub-folder per class, or a self-supervised objective."
        )
    k = cfg.data.samples_per_class
    if cfg.train.batch_size % k:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of data.samples_per_class={k}.")
    if cfg.train.batch_size // k < 2:
        raise ValueError(
            f"P x K batches of train.batch_size={cfg.train.batch_size} with data.samples_per_class={k} hold one "
            "class: there would be no negatives. Use at least 2 classes per batch."
        )
    return PKBatchSampler(dataset.index.labels, cfg.train.batch_size // k, k, seed=cfg.train.seed)


def _loader(cfg: Config, dataset: Any, num_processes: int, pin: bool) -> DataLoader:
    """Random batches, or class-balanced P x K batches for the supervised objectives."""
    sampler = _pk_sampler(cfg, dataset, num_processes)
    workers = cfg.data.num_workers
    common = {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
        "worker_init_fn": worker_init if workers > 0 else None,
    }
    if isinstance(dataset, CachedDataset):
        common["collate_fn"] = batched_collate  # the cache reads whole batches (__getitems__)
    if sampler is not None:
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, **common)


def _data(cfg: Config, accelerator: Accelerator, skip_log: SkipLog) -> tuple[Any, PKBatchSampler | None]:
    """The batches of a run: decoded every epoch, from the disk cache, or from the device cache."""
    d = cfg.data
    if is_hf_source(d.path):
        if d.cache != "none":
            raise ValueError("data.cache works with image folders and file lists; a Hugging Face source keeps its own "
                             "Arrow cache. Set data.cache=none.")
        if d.streaming:
            if not cfg.train.max_steps_per_epoch:
                raise ValueError("data.streaming=true has no epoch length: set train.max_steps_per_epoch.")
            if cfg.objective.name in SUPERVISED:
                raise ValueError("the supervised objectives need P x K batches, which a streamed source cannot give.")
            stream = HFStreamingDataset(d.path, d.image_size, d.split, d.image_column, d.label_column,
                                        accelerator.process_index, accelerator.num_processes, cfg.train.seed)
            loader = DataLoader(stream, batch_size=cfg.train.batch_size, num_workers=d.num_workers,
                                worker_init_fn=worker_init if d.num_workers else None, pin_memory=accelerator.device.type == "cuda")
            passes = cfg.train.max_steps_per_epoch * cfg.train.grad_accumulation  # batches per epoch
            return _StreamBatches(loader, stream, accelerator.device, passes), None
        dataset_hf = HFImageDataset(d.path, d.image_size, d.split, d.image_column, d.label_column,
                                    strict=d.strict, skip_log=skip_log)
        loader = _loader(cfg, dataset_hf, accelerator.num_processes, pin=accelerator.device.type == "cuda")
        return loader, loader.batch_sampler if isinstance(loader.batch_sampler, PKBatchSampler) else None
    if d.cache == "none":
        dataset: Any = ImageFolderDataset(d.path, d.image_size, strict=d.strict, skip_log=skip_log)
    else:
        # the cache's file lock makes one process build while the others wait (no collective
        # barrier, which would time out on a long build under NCCL)
        cache = build_or_load(scan_source(d.path), d.image_size, workers=d.num_workers, strict=d.strict)
        for path, reason in cache.skipped.items():
            skip_log.record(Path(path), reason)
        accelerator.print(f"Decoded cache: {cache.path} ({len(cache.kept)} images, {len(cache.skipped)} skipped)")
        dataset = CachedDataset(cache)
        if d.cache == "device":
            pk = _pk_sampler(cfg, dataset, accelerator.num_processes)  # the same sampler on every process
            batches = DeviceBatches(cache, accelerator.device, cfg.train.batch_size, cfg.train.seed,
                                    accelerator.process_index, accelerator.num_processes, pk)
            return batches, None
    loader = _loader(cfg, dataset, accelerator.num_processes, pin=accelerator.device.type == "cuda")
    return loader, loader.batch_sampler if isinstance(loader.batch_sampler, PKBatchSampler) else None


class _StreamBatches:
    """Fixed-length epochs over a streamed source: ``steps`` batches per epoch, moved to the device."""

    def __init__(self, loader: DataLoader, stream: HFStreamingDataset, device: torch.device, steps: int) -> None:
        self.loader, self.stream, self.device, self.steps = loader, stream, device, steps
        self._it: Any = None

    def set_epoch(self, epoch: int) -> None:
        if self._it is None:
            self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)  # one endless stream across epochs
        for _ in range(self.steps):
            try:
                images, labels = next(self._it)
            except StopIteration:
                raise ValueError("the streamed data set produced no decodable images") from None
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _report_skipped(run_dir: Path, accelerator: Accelerator, epoch: int) -> int:
    """Merges every process's skipped files into ``RUN_DIR/skipped_files.txt``; returns the count."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    found: dict[str, str] = {}
    for part in sorted((run_dir / ".skipped").glob("rank*")):
        for name, reason in SkipLog(part).collect().items():
            found.setdefault(name, reason)
    if found:
        (run_dir / SKIPPED_FILE).write_text("".join(f"{name}\t{reason}\n" for name, reason in sorted(found.items())))
        accelerator.print(
            f"epoch {epoch}: {len(found)} file(s) could not be decoded and were skipped; "
            f"see {run_dir / SKIPPED_FILE} (data.strict=true stops at the first one instead)."
        )
    return len(found)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuses, before any compute, a ``train.mixed_precision`` the device cannot run."""
    if precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "train.mixed_precision=fp16 is not supported on a CPU (no fp16 loss scaling there, and fp16 matmuls "
            "are slow); use train.mixed_precision=bf16 or no."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"train.mixed_precision=bf16 is not supported by {name} (bf16 needs compute capability "
                         ">= 8.0, e.g. A100/H100); use train.mixed_precision=fp16 or no.")


def _check_training(cfg: Config) -> None:
    """Loop settings that cannot work, refused before any compute."""
    t = cfg.train
    if t.grad_accumulation < 1:
        raise ValueError(f"train.grad_accumulation={t.grad_accumulation} must be >= 1 (1: no accumulation).")
    if t.max_nonfinite_steps < 0:
        raise ValueError(f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be >= 0 (0: no check).")
    if t.keep_checkpoints < 1:
        raise ValueError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1.")
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size={t.batch_size} must be >= 1.")


def _check_objective(cfg: Config, num_processes: int) -> None:
    """Objective (and monitor) settings that cannot work, refused before any compute."""
    if cfg.eval.monitor_every and not (cfg.eval.monitor_train and cfg.eval.monitor_test):
        raise ValueError("eval.monitor_every needs eval.monitor_train and eval.monitor_test (labelled folders).")
    o, global_batch = cfg.objective, cfg.train.batch_size * num_processes
    if o.name in ("simclr", "moco_v3") and cfg.train.batch_size < 2:
        raise ValueError(f"objective.name={o.name} needs at least 2 images per process and batch "
                         f"(train.batch_size={cfg.train.batch_size}): batch-norm statistics of one image are degenerate.")
    if o.name == "moco_v2":
        passes = cfg.train.grad_accumulation if cfg.train.grad_accumulation_mode == "cached" else 1
        keys_per_step = global_batch * passes * (2 if o.symmetric else 1)
        if o.queue_size % keys_per_step:
            raise ValueError(
                f"objective.queue_size={o.queue_size} must be a multiple of the keys added at once, {keys_per_step} "
                f"(train.batch_size={cfg.train.batch_size} x {num_processes} processes"
                f"{f' x {passes} cached accumulation passes' if passes > 1 else ''}"
                f"{' x 2 views (symmetric)' if o.symmetric else ''})."
            )
    if o.name == "moco_v2" and num_processes == 1 and o.bn_splits > 1 and cfg.train.batch_size % o.bn_splits:
        raise ValueError(f"objective.bn_splits={o.bn_splits} must divide train.batch_size={cfg.train.batch_size}.")


def train(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Pretrains a backbone with the configured objective and writes everything into ``run_dir``.

    Args:
        cfg: The resolved config.
        run_dir: The run directory (created if missing; see :mod:`twinview.pretrain.runs`).
        resume: Continue from the run's latest checkpoint instead of starting afresh.

    Returns:
        The path of the final ``model.safetensors``.
    """
    run_dir = Path(run_dir)
    if resume and not checkpoints(run_dir):
        raise FileNotFoundError(f"--resume: '{run_dir}' has no checkpoints to resume from.")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Accelerate keeps process-wide singleton state; each run (e.g. several in one notebook or test
    # session) must be free to choose its own mixed precision.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    _check_training(cfg)
    cpu = use_cpu(cfg.train.cpu)
    check_precision(cfg.train.mixed_precision, PartialState(cpu=cpu).device)
    tracker = None if cfg.train.log_with == "none" else cfg.train.log_with
    if tracker:
        _check_tracker(tracker)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=cpu,
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=tracker,
    )
    if tracker:
        accelerator.project_configuration.logging_dir = str(run_dir)
        accelerator.init_trackers("tensorboard" if tracker == "tensorboard" else run_dir.name, config=_flat(as_dict(cfg)))
    set_seed(cfg.train.seed)
    device = accelerator.device
    if accelerator.is_main_process:
        save_config(cfg, run_dir / CONFIG_FILE)

    _check_objective(cfg, accelerator.num_processes)
    skip_log = SkipLog(run_dir / ".skipped" / f"rank{accelerator.process_index}")
    loader, pk_sampler = _data(cfg, accelerator, skip_log)

    model = create_model(cfg.model, predictor=cfg.objective.name == "moco_v3")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    mean, std = normalization_stats(model.backbone)
    if cfg.augment.local_crops:
        raise ValueError(
            f"augment.local_crops={cfg.augment.local_crops}: objective '{cfg.objective.name}' uses two views "
            "and no multi-crop local views; set augment.local_crops=0."
        )
    view_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
    augment = build_views(
        cfg.augment,
        cfg.data.image_size,
        mean,
        std,
        seed=cfg.train.seed * 1_000_003 + accelerator.process_index,  # each process its own stream
        device=device,
        dtype=view_dtype if device.type == "cuda" else torch.float32,
    )

    method = create_method(cfg, model).to(device)  # momentum encoder, queue: state of the method
    peak_lr = scaled_lr(cfg, accelerator.num_processes)
    optimizer = build_optimizer(cfg, model, peak_lr, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(loader, DataLoader):  # the device cache and streams batch themselves, per process
        loader = accelerator.prepare(loader)
    accumulation = cfg.train.grad_accumulation
    steps_per_epoch = len(loader) // accumulation  # optimiser steps per process, after sharding
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"train.grad_accumulation={accumulation} needs at least that many batches per process and "
                         f"epoch; there are {len(loader)}. Lower train.grad_accumulation or train.batch_size.")
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=cfg.optim.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=peak_lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )

    metrics = MetricsLog(run_dir / METRICS_FILE, accelerator.is_main_process, accelerator if tracker else None)
    images_per_step = cfg.train.batch_size * accelerator.num_processes * accumulation
    if not resume:
        metrics.write({"kind": "run", "peak_lr": peak_lr, "lr_scaling": cfg.optim.lr_scaling,
                       "global_batch": images_per_step, "grad_accumulation": accumulation})
    log_every = max(1, cfg.train.log_every)
    multi = accelerator.num_processes > 1
    guard = None
    if cfg.train.max_nonfinite_steps > 0:
        guard = StepGuard(model, method, optimizer, resolve_mode(cfg.train.nonfinite_check, device), device,
                          all_reduce_min=all_reduce_min if multi else None, scaler_skips=accelerator.scaler is not None)
    progress = Progress(guard=guard)
    accelerator.register_for_checkpointing(scheduler, progress, augment.rng, method)
    if resume:
        loaded = _load_latest(accelerator, run_dir)
        accelerator.print(f"Resumed from {loaded} (epoch {progress.epoch}, step {progress.step}).")
        metrics.drop_after(progress.step)
    check_grads = guard is not None and accelerator.scaler is None  # fp16: the GradScaler skips bad gradients
    parameters = list(model.parameters())
    online = accelerator.unwrap_model(model)
    accumulator = Accumulator(accelerator, model, method, accumulation, cfg.train.grad_accumulation_mode)

    def after_step(apply: torch.Tensor | None) -> None:
        method.after_step(online, progress.step, total_steps, apply)

    skipped_total = skipped_before = guard.read_and_reset()[0] if guard is not None else 0
    always_ok = torch.ones((), dtype=torch.bool, device=device)  # the flag when the check is off

    with _StopRequest() as stop, _ending(accelerator):
        for epoch in range(progress.epoch, cfg.train.epochs):
            loader.set_epoch(epoch)
            if pk_sampler is not None:
                pk_sampler.set_epoch(epoch)
            model.train()
            method.train()
            window = _Window(device, time.perf_counter())  # sums stay on the device until a log point
            epoch_loss_sum, epoch_good = 0.0, 0.0
            epoch_start = time.perf_counter()
            done = max(0, progress.step - epoch * steps_per_epoch)  # resumed mid-epoch: steps already done
            bar = tqdm(initial=done, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not accelerator.is_main_process, dynamic_ncols=True)
            for i, (images, labels) in enumerate(loader):
                if i >= steps_per_epoch * accumulation:
                    break
                if i < done * accumulation:  # same seeded order as the interrupted run; views RNG restored
                    continue
                if accumulator.done == 0:  # the first pass of an optimiser step
                    scheduler.step_update(num_updates=progress.step)
                    if guard is not None:
                        guard.begin()
                views = [v.contiguous(memory_format=memory_format) for v in augment(images)]  # (B, 3, S, S) each
                accumulator.add(views, labels)
                if not accumulator.full():
                    continue
                loss_value = accumulator.finish()
                norm = None
                if cfg.optim.clip_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(parameters, cfg.optim.clip_grad_norm)
                elif check_grads:
                    norm = grad_norm(parameters)
                if guard is None:
                    optimizer.step()
                    after_step(None)
                    ok = always_ok
                else:
                    ok = guard.finite(loss_value, norm if check_grads else None)
                    guard.apply(ok, after_step)
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                window.add(loss_value, ok, norm)
                bar.update(1)
                at_end = progress.step == (epoch + 1) * steps_per_epoch
                too_many = guard is not None and guard.mode == "sync" and guard.host_run >= cfg.train.max_nonfinite_steps
                if not (window.steps == log_every or at_end or too_many or (stop.signal is not None and not multi)):
                    continue
                # a log point: the loop's host sync; the processes also agree here on a signal one got
                loss_sum, good, norm_sum, norm_count, stop_votes = accelerator.reduce(
                    window.vector(stop.signal is not None), "sum").tolist()
                skipped_total, worst_run = guard.read_and_reset() if guard is not None else (0, 0)
                now = time.perf_counter()
                rate = window.steps * images_per_step / (now - window.start)
                lr = optimizer.param_groups[0]["lr"]
                mean_loss = loss_sum / good if good else None
                bar.set_postfix(loss=f"{mean_loss:.4f}" if good else "nan", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                record: dict[str, Any] = {"kind": "step", "epoch": epoch + 1, "step": progress.step, "loss": mean_loss,
                                          "lr": lr, "images_per_s": rate}
                if norm_count:
                    record["grad_norm"] = norm_sum / norm_count
                if guard is not None:
                    record["skipped_steps"] = skipped_total
                metrics.write(record)
                epoch_loss_sum, epoch_good = epoch_loss_sum + loss_sum, epoch_good + good
                window.reset(now)
                if worst_run >= cfg.train.max_nonfinite_steps > 0:
                    bar.close()
                    metrics.write({"kind": "stopped", "reason": "non-finite", "step": progress.step, "epoch": epoch + 1})
                    raise NonFiniteTraining(_nonfinite_message(cfg, run_dir, worst_run, progress.step, epoch + 1))
                if stop_votes:
                    bar.close()
                    signum = stop.signal or signal.SIGTERM  # another process got it
                    saved = _save_checkpoint(accelerator, run_dir, cfg.train.keep_checkpoints, progress.epoch, progress.step)
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name} at step {progress.step} (epoch {epoch + 1}): the step "
                        f"finished and {saved} was written. Resume with: twinview pretrain --resume {run_dir}",
                        signum,
                    )
            bar.close()
            seconds = time.perf_counter() - epoch_start
            progress.epoch = epoch + 1
            epoch_mean = epoch_loss_sum / epoch_good if epoch_good else float("nan")
            if guard is None and not math.isfinite(epoch_mean):
                raise FloatingPointError(f"loss became {epoch_mean} in epoch {epoch + 1}; lower optim.lr.")
            skipped = _report_skipped(run_dir, accelerator, epoch + 1)
            record = {"kind": "epoch", "epoch": epoch + 1, "step": progress.step,
                      "loss": epoch_mean if epoch_good else None, "seconds": seconds,
                      "images_per_s": (steps_per_epoch - done) * images_per_step / seconds, "skipped_files": skipped}
            if guard is not None:
                record["skipped_steps"] = skipped_total - skipped_before
                skipped_before = skipped_total
            if cfg.eval.monitor_every and (epoch + 1) % cfg.eval.monitor_every == 0:
                record.update(monitor_knn(cfg, accelerator, model))
            metrics.write(record)
            if progress.epoch % max(1, cfg.train.checkpoint_every) == 0 or progress.epoch == cfg.train.epochs:
                _save_checkpoint(accelerator, run_dir, cfg.train.keep_checkpoints, progress.epoch)

    accelerator.wait_for_everyone()
    weights = run_dir / WEIGHTS_FILE
    if accelerator.is_main_process:
        weights = save_weights(accelerator.unwrap_model(model), run_dir)
        accelerator.print(f"Saved weights to {weights}")
    accelerator.end_training()  # trackers, then the process group
    return weights


@contextlib.contextmanager
def _ending(accelerator: Accelerator) -> Iterator[None]:
    """Flushes and closes the trackers when training stops early (interrupted, non-finite, error)."""
    try:
        yield
    except BaseException:
        for tracker in accelerator.trackers:
            tracker.finish()
        raise


class _Window:
    """Sums over the steps since the last log point, kept on the device: loss and gradient norm of
    the good (finite) steps and their count."""

    def __init__(self, device: torch.device, start: float) -> None:
        self.sums = torch.zeros(4, device=device)  # loss, good steps, gradient norm, steps with a finite norm
        self.steps, self.start = 0, start

    def add(self, loss: torch.Tensor, ok: torch.Tensor, norm: torch.Tensor | None) -> None:
        zero = torch.zeros((), device=self.sums.device)
        if norm is None:
            norm_term, norm_ok = zero, zero
        else:  # under fp16 a good step may still have an overflowing (scaled) norm: left out
            finite = ok & torch.isfinite(norm)
            norm_term, norm_ok = torch.where(finite, norm.float(), zero), finite.float()
        self.sums += torch.stack([torch.where(ok, loss.float(), zero), ok.float(), norm_term, norm_ok])
        self.steps += 1

    def vector(self, stop: bool) -> torch.Tensor:
        """The sums plus this process's stop vote, for one all-reduce."""
        return torch.cat([self.sums, torch.full((1,), float(stop), device=self.sums.device)])

    def reset(self, start: float) -> None:
        self.sums.zero_()
        self.steps, self.start = 0, start


def _nonfinite_message(cfg: Config, run_dir: Path, run: int, step: int, epoch: int) -> str:
    saved = checkpoints(run_dir)
    if saved:
        then = f"the newest checkpoint, {saved[-1]}, is intact. Continue from it with: twinview pretrain --resume {run_dir} optim.lr=..."
    else:
        then = "no checkpoint had been written yet. Start again with: twinview pretrain --overwrite ... optim.lr=..."
    return (
        f"{run} optimiser steps in a row had a non-finite loss or gradient (up to step {step}, epoch {epoch}). Each "
        f"was skipped, so the weights are those of the last finite step, and training stopped "
        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optim.lr, set optim.clip_grad_norm "
        f"(e.g. 1.0) or use train.mixed_precision=no/bf16; {then}"
    )


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, keep: int, epoch: int, step: int | None = None) -> Path:
    """Saves a resumable checkpoint atomically and keeps only the newest ``keep``.

    Every process writes into ``NAME.partial``; the main process renames it once all are done, so a
    run killed while saving leaves no directory that looks like a checkpoint.
    """
    final = checkpoint_path(run_dir, epoch, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_latest(accelerator: Accelerator, run_dir: Path) -> Path:
    """Loads the newest checkpoint that loads; a corrupt one is reported and the previous one used."""
    found = checkpoints(run_dir)
    for candidate in reversed(found):
        try:
            accelerator.load_state(str(candidate))
            return candidate
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
            accelerator.print(f"Checkpoint {candidate} cannot be loaded ({type(err).__name__}: {err}); trying an older one.")
    raise FileNotFoundError(f"--resume: none of the {len(found)} checkpoints of '{run_dir}' could be loaded.")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after checkpointing; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish its step, checkpoint and exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
