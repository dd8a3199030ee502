"""The pretraining loop: HF Accelerate on one CPU, one GPU or many processes.

``train()`` builds the run (:func:`build_run`, in the order of the data flow: config checks ->
batches -> model (backbone + head) -> views -> method (objective) -> optimiser and schedule ->
Accelerate), then runs its epochs (:func:`run_epochs`) of :func:`train_step`: forward, loss and
backward of each pass (or of all passes at once, with cached gradient accumulation), gradient
clipping, the optimiser step and the method's update (MoCo's momentum encoder and queue), both
skipped when the loss or gradient is not finite, and the learning-rate schedule. Logging,
checkpoints, signals and the kNN monitor are named helpers around the step.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.scheduler import CosineLRScheduler
from torch import nn

from twinview.augment.progressive import ResolutionSchedule, resolution_schedule
from twinview.augment.views import MultiView, build_views
from twinview.pretrain.config import Config, as_dict, save_config
from twinview.pretrain.data.folder import SkipLog
from twinview.pretrain.data.loaders import Batches, build_batches
from twinview.pretrain.data.source import resolve_data, resolve_image_size
from twinview.pretrain.distributed import all_reduce_min, cpu_computes_bf16, everyone, process_state, use_cpu
from twinview.pretrain.engine.accumulation import Pass, cached_passes, concat, gradient_sync
from twinview.pretrain.engine.checkpoints import Progress, load_latest, save_checkpoint
from twinview.pretrain.engine.metrics_log import (
    MetricsLog,
    TrainingLog,
    flat_hyperparameters,
    report_skipped,
    run_record,
)
from twinview.pretrain.engine.monitor import Monitor, build_monitor, monitor_knn
from twinview.pretrain.engine.optim import build_optimizer, build_scheduler, scaled_lr
from twinview.pretrain.engine.run_start import (
    StartInfo,
    check_view_sides,
    estimate_lines,
    print_start,
    resolve_precision,
)
from twinview.pretrain.engine.signals import StopRequest, TrainingInterrupted
from twinview.pretrain.engine.step_guard import NonFiniteTraining, StepGuard, grad_norm, resolve_mode
from twinview.pretrain.models import ContrastiveModel, create_run_model, normalization_stats
from twinview.pretrain.objectives.methods import Method, create_method
from twinview.pretrain.runs import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, checkpoints, save_weights
from twinview.pretrain.validate import World, validate, validate_data, validate_epoch


@dataclass
class Trainer:
    """What one optimiser step touches (:func:`train_step`), built once by :func:`build_run`."""

    cfg: Config
    accelerator: Accelerator
    model: nn.Module  # backbone + head (+ predictor), prepared (DDP on several processes)
    online: ContrastiveModel  # the same model unwrapped, for the method's update
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    guard: StepGuard
    progress: Progress
    steps_per_epoch: int
    total_steps: int
    parameters: list[nn.Parameter]  # of the prepared model, for clipping and the gradient norm
    passes: int  # forward/backward passes per optimiser step (train.grad_accumulation)
    cached: bool  # several passes with one loss over all of them (GradCache)


@dataclass
class Run:
    """A run built by :func:`build_run`: the trainer and what the loop around its steps needs."""

    trainer: Trainer
    run_dir: Path
    batches: Batches
    views: MultiView
    memory_format: torch.memory_format
    steps_per_epoch: int
    metrics: MetricsLog
    log: TrainingLog
    monitor: Monitor | None  # kNN on a labelled hold-out every eval.monitor_every epochs
    resolution: ResolutionSchedule | None  # the global views' side per epoch (augment.progressive_min)
    skip_log: SkipLog  # this process's undecodable files
    shared: bool  # every process sees the run directory (else it is the main node's alone)


def train_step(t: Trainer, passes: Iterable[Pass]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimiser step over its passes (``train.grad_accumulation`` of them, usually one).

    Returns the step's loss (detached), whether it was applied (a 0-dim bool on the device) and
    the gradient norm (when clipped or checked), all without a host sync.
    """
    t.scheduler.step_update(num_updates=t.progress.step)
    t.guard.snapshot_buffers()  # batch-norm statistics, MoCo queue: put back if the step is skipped
    t.method.start_step(t.progress.step, t.steps_per_epoch)  # scheduled settings (DINO's teacher temperature)
    if t.cached:  # several passes, one loss over all of them, as one big batch (accumulation.py)
        loss, keys = cached_passes(t.accelerator, t.model, t.method, passes)
    else:  # one pass, or independent passes whose gradients add up
        losses, pass_keys = [], []
        for i, (views, labels) in enumerate(passes):
            with gradient_sync(t.accelerator, t.model, last=i == t.passes - 1):
                with t.accelerator.autocast():  # also the MoCo key encoder, which is not a prepared model
                    loss, keys = t.method(t.model, views, labels)  # forward: embeddings, keys, loss
                t.accelerator.backward(loss / t.passes)
            losses.append(loss.detach())
            pass_keys.append(keys)
        loss, keys = torch.stack(losses).mean(), concat(pass_keys)
    if t.cfg.optim.clip_grad_norm > 0:
        norm = t.accelerator.clip_grad_norm_(t.parameters, t.cfg.optim.clip_grad_norm)
    else:  # measured only for the non-finite check
        norm = grad_norm(t.parameters) if t.guard.checks_gradients else None
    step = t.guard.decide(loss, norm)  # skip a non-finite step (every process agrees)
    if step.step_optimizer:
        t.optimizer.step()
    t.guard.restore_weights(step)  # a non-finite step decided on the device: weights put back
    if step.update_method:  # momentum encoder and queue; a skipped step leaves them as they were
        t.method.after_step(t.online, keys, t.progress.step, t.total_steps, step.apply)
    t.guard.restore_buffers(step)
    t.optimizer.zero_grad(set_to_none=True)
    t.progress.step += 1
    return loss, step.ok, norm


def train(cfg: Config, run_dir: Path, resume: bool = False, recipe: str = "") -> Path:
    """Pretrains a backbone with the configured objective and writes everything into ``run_dir``.

    Args:
        cfg: The config, as loaded (``auto`` settings are resolved here).
        run_dir: The run directory (created if missing; see :mod:`twinview.pretrain.runs`).
        resume: Continue from the run's latest checkpoint instead of starting afresh.
        recipe: The recipe the config came from, for the start-of-run summary.

    Returns:
        The path of the final ``model.safetensors``.
    """
    return run_epochs(build_run(cfg, run_dir, resume, recipe))


def build_run(cfg: Config, run_dir: Path, resume: bool = False, recipe: str = "") -> Run:
    """Checks the config against the device, resolves ``data.path`` once (the :class:`Source` every
    later step takes) and checks the config against it, builds batches, model, views, method,
    optimiser and schedule, prints the start block, and resumes from the latest checkpoint when
    asked (see :func:`train`)."""
    run_dir = Path(run_dir)
    # Accelerate keeps process-wide singleton state; each run (e.g. several in one notebook or test
    # session) must be free to choose its own mixed precision.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    world = current_world(cfg)
    if resume and not everyone(bool(checkpoints(run_dir)), PartialState().device):  # before anything is written
        raise FileNotFoundError(
            f"--resume: '{run_dir}' has no checkpoints to resume from"
            + (
                " on every process (several machines resume only from a disk they all see: docs/SCALE.md)."
                if world.processes > 1
                else "."
            )
        )
    validate(cfg, world)  # the settings, before the data is read
    source = resolve_data(cfg.data)  # the one reading of data.path; a stream is not downloaded
    cfg, size = resolve_image_size(cfg, source)  # data.image_size=auto resolved, and saved so below
    cfg, precision = resolve_precision(cfg, world)  # train.mixed_precision=auto likewise
    validate(cfg, world)  # the resolved size and precision
    validate_data(cfg, world, source)  # before any compute
    monitor = build_monitor(cfg)  # its folders resolved and checked now, not after the first epoch
    accelerator = _accelerator(cfg, run_dir)
    device = accelerator.device
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:  # only the main process writes the run directory
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    shared = _shared_run_dir(accelerator, run_dir)
    own = run_dir / ".skipped" / f"rank{accelerator.process_index}"
    skip_log = SkipLog(own if shared else Path(tempfile.mkdtemp(prefix="twinview-skipped-")))
    batches = build_batches(cfg, source, accelerator, skip_log)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    online = create_run_model(cfg).to(memory_format=memory_format)  # as the objective says (predictor, ...)
    mean, std = normalization_stats(online.backbone)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
    dtype = low if device.type == "cuda" else torch.float32
    seed = cfg.train.seed * 1_000_003 + accelerator.process_index  # each process its own random stream
    views = build_views(cfg.augment, cfg.data.size, mean, std, seed=seed, device=device, dtype=dtype)
    resolution = resolution_schedule(cfg.augment, views.side, cfg.train.epochs)
    if resolution is not None:  # every side the schedule will make, tried before training
        sides = {s for epoch in range(cfg.train.epochs) for s in views.sides_at(resolution.side(epoch))}
        check_view_sides(online.backbone, sorted(sides))
    method = create_method(cfg, online).to(device)  # momentum encoder, queue: state of the method
    peak_lr = scaled_lr(cfg, accelerator.num_processes)
    optimizer = build_optimizer(cfg, online, peak_lr, device)
    if cfg.train.compile:  # after the method copied its momentum encoder, which stays eager
        online.compile()  # in place: the same parameters and state-dict keys
    model, optimizer = accelerator.prepare(online, optimizer)  # model: DDP-wrapped on several processes
    batches.prepare(accelerator)
    validate_epoch(cfg, len(batches))
    steps_per_epoch = len(batches) // cfg.train.grad_accumulation  # optimiser steps per process, after sharding
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, peak_lr, steps_per_epoch)
    info = StartInfo(source, size, precision, resolution.describe(cfg.train.epochs) if resolution else "")
    print_start(accelerator, cfg, info, recipe, online, world, peak_lr, steps_per_epoch)
    mode = resolve_mode(cfg.train.nonfinite_check, cfg.train.max_nonfinite_steps, device)
    reduce = all_reduce_min if accelerator.num_processes > 1 else None
    guard = StepGuard(model, method, optimizer, mode, device, reduce, scaler_skips=accelerator.scaler is not None)
    progress = Progress(guard=guard)
    accelerator.register_for_checkpointing(scheduler, progress, views.rng, method)

    metrics = MetricsLog(
        run_dir / METRICS_FILE, accelerator.is_main_process, accelerator if accelerator.trackers else None
    )
    passes = cfg.train.grad_accumulation
    images_per_step = cfg.train.batch_size * accelerator.num_processes * passes
    if resume:
        loaded = load_latest(accelerator, run_dir)
        accelerator.print(f"Resumed from {loaded} (epoch {progress.epoch}, step {progress.step}).")
        metrics.drop_after(progress.step)
    else:
        metrics.write(run_record(cfg, peak_lr, images_per_step))
    steps_left = steps_per_epoch * cfg.train.epochs - progress.step
    timed_side = 0  # the side the first steps are timed at, when smaller than the full one
    if resolution is not None and resolution.side(progress.epoch) < resolution.high:
        timed_side = resolution.side(progress.epoch)
    estimate = partial(
        estimate_lines, cfg, world, recipe, steps_per_epoch, steps_left, images_per_step, timed_side=timed_side
    )
    log = TrainingLog(
        accelerator,
        metrics,
        guard,
        optimizer,
        images_per_step,
        cfg.train.log_every,
        cfg.train.max_nonfinite_steps,
        estimate if steps_left > 1 else None,
    )
    trainer = Trainer(
        cfg,
        accelerator,
        model,
        online,
        method,
        optimizer,
        scheduler,
        guard,
        progress,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * cfg.train.epochs,
        parameters=list(model.parameters()),
        passes=passes,
        cached=passes > 1 and cfg.train.grad_accumulation_mode == "cached",
    )
    return Run(
        trainer,
        run_dir=run_dir,
        batches=batches,
        views=views,
        memory_format=memory_format,
        steps_per_epoch=steps_per_epoch,
        metrics=metrics,
        log=log,
        monitor=monitor,
        resolution=resolution,
        skip_log=skip_log,
        shared=shared,
    )


def run_epochs(run: Run) -> Path:
    """Trains the remaining epochs of a built run, checkpointing as configured; saves and returns
    the final weights."""
    t, log = run.trainer, run.log
    cfg, accelerator, progress = t.cfg, t.accelerator, t.progress
    with StopRequest() as stop, _closing_trackers(accelerator), run.batches:
        for epoch in range(progress.epoch, cfg.train.epochs):
            run.batches.set_epoch(epoch)
            if run.resolution is not None:  # a function of the epoch: a resumed run makes the same views
                run.views.set_side(run.resolution.side(epoch))
            t.model.train()
            t.method.train()
            done = max(0, progress.step - epoch * run.steps_per_epoch)  # resumed mid-epoch: steps already done
            log.start_epoch(epoch, cfg.train.epochs, run.steps_per_epoch, done)
            for passes in _step_passes(run, done):
                loss, ok, norm = train_step(t, passes)
                log.add(loss, ok, norm)
                if log.due(progress.step, stop.signal is not None):
                    worst_run, stop_voted = log.flush(progress.step, stop.signal is not None)
                    _stop_if_asked(run, worst_run, stop_voted, stop.signal)
            progress.epoch = epoch + 1
            record = log.end_epoch(progress.step)
            record["skipped_files"] = report_skipped(run.run_dir, accelerator, run.skip_log, epoch + 1)
            if run.resolution is not None:
                record["view_side"] = run.views.side
            if run.monitor is not None and (epoch + 1) % cfg.eval.monitor_every == 0:
                record.update(monitor_knn(run.monitor, accelerator, t.model))
            run.metrics.write(record)
            if progress.epoch % max(1, cfg.train.checkpoint_every) == 0 or progress.epoch == cfg.train.epochs:
                save_checkpoint(accelerator, run.run_dir, cfg.train.keep_checkpoints, progress.epoch, shared=run.shared)

    accelerator.wait_for_everyone()
    if not run.shared:  # this process's skip log lived in a temporary folder
        shutil.rmtree(run.skip_log.directory, ignore_errors=True)
    weights = run.run_dir / WEIGHTS_FILE
    if accelerator.is_main_process:
        weights = save_weights(t.online, run.run_dir)
        accelerator.print(f"Saved weights to {weights}")
    accelerator.end_training()  # trackers, then the process group
    return weights


def current_world(cfg: Config) -> World:
    """The processes and device this run trains on (Accelerate's process state), for the checks."""
    state = process_state(cfg.train.cpu)
    cuda = state.device.type == "cuda"
    return World(
        processes=state.num_processes,
        device_type=state.device.type,
        bf16_supported=torch.cuda.is_bf16_supported() if cuda else True,
        device_name=torch.cuda.get_device_name(state.device) if cuda else state.device.type,
        bf16_native=torch.cuda.is_bf16_supported() if cuda else cpu_computes_bf16(),
    )


def _shared_run_dir(accelerator: Accelerator, run_dir: Path, wait_s: float = 10.0) -> bool:
    """Whether every process sees the run directory the main process just wrote (one disk, or a
    shared file system), asked once at the start. A process that does not see it yet looks again
    for ``wait_s`` (a network file system may show a new file late) before the answer is no; then
    the main node writes the run alone, and the start says that checkpoints resume only where every
    node sees them."""
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + wait_s
    while not (seen := (run_dir / CONFIG_FILE).is_file()) and time.monotonic() < deadline:
        time.sleep(0.5)
    shared = everyone(seen, accelerator.device)
    if not shared:
        accelerator.print(
            f"The other nodes do not see {run_dir}: the main node writes the run alone (config, logs, "
            f"checkpoints, weights). Resuming needs the run directory on a disk every node shares (docs/SCALE.md)."
        )
    return shared


def _accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """Accelerate with the run's precision, seedable data order and trackers (``train.log_with``)."""
    tracker = None if cfg.train.log_with == "none" else cfg.train.log_with
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=use_cpu(cfg.train.cpu),
        project_dir=str(run_dir),
        log_with=tracker,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if tracker:
        accelerator.project_configuration.logging_dir = str(run_dir)
        accelerator.init_trackers(
            "tensorboard" if tracker == "tensorboard" else run_dir.name, config=flat_hyperparameters(as_dict(cfg))
        )
    return accelerator


def _step_passes(run: Run, done: int) -> Iterator[Iterator[Pass]]:
    """The passes of each remaining optimiser step of the epoch, ``train.grad_accumulation`` per step.

    Each step's passes are made as the step reaches them: a pass's views are made when its batch
    arrives (a device-cache batch is only valid until the next-but-one is drawn, and independent
    accumulation then holds one pass's views at a time). A resumed epoch reads and drops the
    batches of the ``done`` steps: the order is seeded, and the views' random state was restored
    with the checkpoint.
    """

    def made(images: torch.Tensor, labels: torch.Tensor) -> Pass:
        return [v.contiguous(memory_format=run.memory_format) for v in run.views(images)], labels  # (B, 3, S, S) each

    passes = run.trainer.passes
    it = iter(run.batches)
    for _ in itertools.islice(it, done * passes):
        pass
    for _ in range(done, run.steps_per_epoch):
        first = next(it, None)
        if first is None:  # a stream that ended early
            return
        yield (made(images, labels) for images, labels in itertools.chain([first], itertools.islice(it, passes - 1)))


def _stop_if_asked(run: Run, worst_run: int, stop_voted: bool, signum: int | None) -> None:
    """Ends training at a log point: too many non-finite steps in a row, or a signal any process got
    (the step finished; a checkpoint is written first)."""
    t, run_dir = run.trainer, run.run_dir
    cfg, progress = t.cfg, t.progress
    epoch = progress.epoch + 1  # the epoch under way
    if worst_run >= cfg.train.max_nonfinite_steps > 0:
        run.metrics.write({"kind": "stopped", "reason": "non-finite", "step": progress.step, "epoch": epoch})
        raise NonFiniteTraining(_nonfinite_message(cfg, run_dir, worst_run, progress.step, epoch))
    if stop_voted:
        signum = signum or signal.SIGTERM  # another process got it
        saved = save_checkpoint(
            t.accelerator, run_dir, cfg.train.keep_checkpoints, progress.epoch, progress.step, shared=run.shared
        )
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {progress.step} (epoch {epoch}): the step finished and {saved} "
            f"was written. "
            + (
                "The same command continues it (train.resume=auto)."
                if cfg.train.resume == "auto"
                else f"Resume with: twinview pretrain --resume {run_dir}"
            ),
            signum,
        )


@contextlib.contextmanager
def _closing_trackers(accelerator: Accelerator) -> Iterator[None]:
    """Flushes and closes the trackers when training stops early (interrupted, non-finite, error)."""
    try:
        yield
    except BaseException:
        for tracker in accelerator.trackers:
            tracker.finish()
        raise


def _nonfinite_message(cfg: Config, run_dir: Path, run: int, step: int, epoch: int) -> str:
    saved = checkpoints(run_dir)
    if saved:
        then = (
            f"the newest checkpoint, {saved[-1]}, is intact. Continue from it with: "
            f"twinview pretrain --resume {run_dir} optim.lr=..."
        )
    else:
        then = "no checkpoint had been written yet. Start again with: twinview pretrain --overwrite ... optim.lr=..."
    return (
        f"{run} optimiser steps in a row had a non-finite loss or gradient (up to step {step}, epoch {epoch}). Each "
        f"was skipped, so the weights are those of the last finite step, and training stopped "
        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optim.lr, set optim.clip_grad_norm "
        f"(e.g. 1.0) or use train.mixed_precision=no/bf16; {then}"
    )
