"""Fine-tuning: a backbone and a fresh classifier trained end to end on (a subset of) labelled
images, then scored on a test set. What ``twinview finetune`` runs once per label budget, for the
pretrained backbone and for a random init of the same architecture.

Built from the pieces pretraining uses: timm's model API (``reset_classifier`` for the fresh head),
its optimiser factory (layer-wise lr decay for ViTs) and cosine schedule, Accelerate for devices,
precision and processes (each process takes its share of every batch, as in pretraining), the
on-device views (random resized crop and flip, per sample, with a checkpointed random state), and
the same atomic, resumable checkpoints (at an epoch's end at most every ``CHECKPOINT_EVERY_S``, and
mid-epoch on SIGTERM/SIGINT). The step
is :func:`finetune_step`; :func:`finetune` is the loop around it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from accelerate.utils import broadcast as accelerate_broadcast
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from twinview.augment.sampling import ViewRNG
from twinview.augment.views import Normalize, ViewPipeline, ViewSpec, to_unit_float
from twinview.evaluate.features import quiet_worker
from twinview.evaluate.progress import Progress as Bar
from twinview.evaluate.results import FinetuneScore
from twinview.pretrain.data.cache import CachedDataset, batched_collate
from twinview.pretrain.data.loaders import Batches
from twinview.pretrain.distributed import join_process_group, use_cpu
from twinview.pretrain.engine.checkpoints import Progress, load_latest, save_checkpoint
from twinview.pretrain.engine.optim import cosine_schedule
from twinview.pretrain.engine.signals import StopRequest, TrainingInterrupted
from twinview.pretrain.models import normalization_stats
from twinview.pretrain.runs import checkpoints

CHECKPOINT_EVERY_S = 300.0  # at an epoch's end, at most this often (and mid-epoch on SIGTERM/SIGINT)
LOG_FILE = "log.jsonl"  # one line per epoch (and per stop), in each fine-tune's folder
RESULT_FILE = "result.json"  # written when a fine-tune has finished and been scored
WEIGHTS_FILE = "model.pt"  # the fine-tuned classifier's state dict, beside its result


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning recipe, the same for every budget and both inits.

    Attributes:
        epochs: Passes over the labelled subset; a small subset gets more (see ``min_steps``).
        min_steps: Optimiser steps a fine-tune takes at least (small subsets: more epochs).
        batch_size: Images per process per step (at most the subset's share of a process).
        lr: Peak learning rate (already scaled for the global batch).
        weight_decay: AdamW weight decay (norms and biases excluded).
        layer_decay: Layer-wise lr decay (timm's ``layer_decay``; ViTs), or None.
        warmup_fraction: Share of the steps spent warming up the learning rate.
        label_smoothing: Of the cross-entropy.
        crop_size: Side of the training crops.
        crop_scale: Area range of the random resized crop.
        flip_p: Horizontal flip probability.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (resolved: not ``auto``).
        seed: Of the head's init, the data order and the views.
        num_workers: Loader processes.
        eval_batch_size: Test images per forward pass.
        clip_grad_norm: Gradient norm clipping (0: off).
    """

    epochs: int
    min_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    layer_decay: float | None
    warmup_fraction: float
    label_smoothing: float
    crop_size: int
    crop_scale: tuple[float, float]
    flip_p: float
    mixed_precision: str
    seed: int
    num_workers: int
    eval_batch_size: int
    clip_grad_norm: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_vit(backbone: nn.Module) -> bool:
    """A transformer with patch embedding and blocks (timm's ViT family), for the defaults."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def default_lr(backbone: nn.Module, global_batch: int) -> float:
    """AdamW peak lr per architecture, scaled linearly from a batch of 256: 1e-3 for CNNs (timm's
    fine-tuning default), 5e-4 for ViTs with layer decay (BEiT / MAE fine-tuning)."""
    return (5e-4 if is_vit(backbone) else 1e-3) * global_batch / 256


def default_layer_decay(backbone: nn.Module) -> float | None:
    """0.75 for ViTs (MAE's fine-tuning of ViT-B), None (off) for CNNs."""
    return 0.75 if is_vit(backbone) else None


def classifier(backbone: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``backbone`` with a fresh, seeded linear head of ``num_classes`` (timm's
    ``reset_classifier``), in train mode."""
    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    return model.train()


def _loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0 and shuffle,
        pin_memory=pin,
        worker_init_fn=quiet_worker if workers else None,
        collate_fn=cast(Any, batched_collate) if _cached(dataset) else None,  # the cache reads whole batches
    )


def _cached(dataset: Dataset) -> bool:
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    return isinstance(inner, CachedDataset)


def make_accelerator(mixed_precision: str, cpu: bool = False) -> Accelerator:
    """The Accelerator of one fine-tune (each has its own: its checkpoint holds only its model).

    Accelerate keeps process-wide state whose precision is fixed once set; it is reset first (as
    pretraining's ``build_run`` does), so a fine-tune may follow a run of another precision in the
    same process (a notebook, a benchmark that pretrains first)."""
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    on_cpu = use_cpu(cpu)
    join_process_group(on_cpu)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=on_cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


@dataclass
class Finetuner:
    """What one fine-tuning step touches (:func:`finetune_step`)."""

    accelerator: Accelerator
    model: nn.Module  # prepared (DDP on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    view: ViewPipeline  # random resized crop + flip + normalise, on the device
    rng: ViewRNG
    progress: Progress
    settings: FinetuneSettings


def finetune_step(t: Finetuner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a batch of uint8 images; returns the loss (detached, no host sync)."""
    t.scheduler.step_update(num_updates=t.progress.step)
    x = t.view(images, t.rng)  # (B, 3, crop, crop), per-sample crops and flips
    with t.accelerator.autocast():
        loss = F.cross_entropy(t.model(x), labels, label_smoothing=t.settings.label_smoothing)
    t.accelerator.backward(loss)
    if t.settings.clip_grad_norm > 0:
        t.accelerator.clip_grad_norm_(t.model.parameters(), t.settings.clip_grad_norm)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.progress.step += 1
    return loss.detach()


def plan(subset_size: int, settings: FinetuneSettings, processes: int) -> tuple[int, int, int]:
    """The batch per process, steps per epoch and epochs of a fine-tune on ``subset_size`` images.

    A subset smaller than a global batch is taken whole in each step; epochs grow until the
    fine-tune takes ``settings.min_steps`` steps.
    """
    if subset_size < processes:
        raise ValueError(f"{subset_size} labelled images cannot be shared among {processes} processes.")
    batch = min(settings.batch_size, subset_size // processes)
    steps_per_epoch = subset_size // (batch * processes)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))
    return batch, steps_per_epoch, epochs


def finetune(
    backbone: nn.Module,
    num_classes: int,
    train_set: Dataset,
    indices: np.ndarray,
    test_set: Dataset,
    test_labels: torch.Tensor,
    settings: FinetuneSettings,
    folder: Path,
    resume: bool = False,
    progress_line: str = "",
) -> tuple[FinetuneScore, nn.Module, torch.Tensor]:
    """Fine-tunes ``backbone`` with a fresh head on ``train_set[indices]`` and scores it on ``test_set``.

    Args:
        backbone: The starting backbone (timm, ``num_classes=0``); it is copied, not changed.
        num_classes: Classes of the head.
        train_set: Labelled ``(uint8 (3,S,S) image, label)`` items (the decoded cache or any data set).
        indices: The labelled subset to train on.
        test_set: Labelled test items.
        test_labels: ``(M,)`` their labels, in order.
        settings: The recipe.
        folder: This fine-tune's folder: checkpoints, ``log.jsonl``, and when done ``result.json``
            and ``model.pt``.
        resume: Continue from the newest checkpoint in ``folder`` (start fresh when there is none).
        progress_line: Prefix of the per-epoch lines printed (which budget and init).

    Returns:
        Its test score, the fine-tuned model (unwrapped, eval mode, on the CPU) and the ``(M, C)``
        test logits (on the main process; the others return an empty tensor).

    Raises:
        TrainingInterrupted: On SIGTERM/SIGINT, after a checkpoint was written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(settings.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    batch, steps_per_epoch, epochs = plan(len(indices), settings, world)
    set_seed(settings.seed)  # the data order (seedable sampler)
    model = classifier(backbone, num_classes, settings.seed)
    mean, std = normalization_stats(model)
    optimizer = create_optimizer_v2(
        model,
        opt="adamw",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        layer_decay=settings.layer_decay,
        filter_bias_and_bn=True,
    )
    total_steps = steps_per_epoch * epochs
    scheduler = cosine_schedule(optimizer, settings.lr, total_steps, round(settings.warmup_fraction * total_steps))
    spec = ViewSpec(
        settings.crop_size,
        settings.crop_scale,
        flip_p=settings.flip_p,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision, torch.float32)
    dtype = low if accelerator.device.type == "cuda" else torch.float32  # as pretraining: float32 views on a CPU
    view = ViewPipeline(spec, mean, std, dtype).to(accelerator.device)
    pin = accelerator.device.type == "cuda"
    loader = _loader(Subset(train_set, indices.tolist()), batch, settings.num_workers, shuffle=True, pin=pin)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rng = ViewRNG(settings.seed * 1_000_003 + rank, accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress, rng)
    if resume and checkpoints(folder):
        loaded = load_latest(accelerator, folder)
        accelerator.print(f"{progress_line}resumed from {loaded} (epoch {progress.epoch}, step {progress.step})")
    t = Finetuner(accelerator, model, optimizer, scheduler, view, rng, progress, settings)
    log = folder / LOG_FILE
    started = time.perf_counter()
    seconds = _previous_seconds(log, progress.step)
    last_saved = time.perf_counter()
    # the workers ignore SIGTERM (a launcher signals the whole group): stopped here however the
    # loop ends, or an uncaught interrupt would leave the interpreter waiting for them at exit
    with StopRequest() as stop, Batches(loader):
        for epoch in range(progress.epoch, epochs):
            loader.set_epoch(epoch)
            model.train()
            done = progress.step - epoch * steps_per_epoch  # resumed mid-epoch: the seeded order's first batches
            total = torch.zeros((), device=accelerator.device)
            bar = Bar(
                steps_per_epoch,
                f"{progress_line}epoch {epoch + 1}/{epochs}",
                "step",
                initial=done,
                enabled=accelerator.is_main_process,
            )
            for images, labels in itertools.islice(loader, done, steps_per_epoch):
                total += finetune_step(t, images, labels)
                bar.update()
                if _stop_voted(accelerator, stop.signal):
                    bar.close()
                    _interrupt(t, folder, log, seconds + time.perf_counter() - started, stop.signal)
            progress.epoch = epoch + 1
            loss = (total / (steps_per_epoch - done)).item() if steps_per_epoch > done else float("nan")
            elapsed = seconds + time.perf_counter() - started
            bar.set_postfix(loss=f"{loss:.4f}", elapsed=f"{elapsed:.0f} s")
            bar.close()
            if accelerator.is_main_process:
                _append(
                    log, {"kind": "epoch", "epoch": epoch + 1, "step": progress.step, "loss": loss, "seconds": elapsed}
                )
            if _checkpoint_due(accelerator, last_saved):
                save_checkpoint(accelerator, folder, 1, progress.epoch)
                last_saved = time.perf_counter()
    train_seconds = seconds + time.perf_counter() - started
    net = accelerator.unwrap_model(model).eval()
    logits = predict(net, test_set, settings, accelerator, mean, std)
    accelerator.wait_for_everyone()
    net = net.to("cpu")
    top1, top5 = top_k(logits, test_labels) if accelerator.is_main_process else (0.0, 0.0)
    score = FinetuneScore(top1, top5, epochs=epochs, steps=progress.step, seconds=round(train_seconds, 2))
    accelerator.free_memory()
    return score, net, logits


def _checkpoint_due(accelerator: Accelerator, last_saved: float) -> bool:
    """Whether an epoch's end should checkpoint: once ``CHECKPOINT_EVERY_S`` have passed since the
    last one (a small subset's epoch is one step: a checkpoint each would cost more than the step).
    The main process decides, so every process saves together."""
    due = torch.tensor([float(time.perf_counter() - last_saved >= CHECKPOINT_EVERY_S)], device=accelerator.device)
    if accelerator.num_processes > 1:
        due = accelerate_broadcast(due)
    return bool(due.item())


def _stop_voted(accelerator: Accelerator, signum: int | None) -> bool:
    """Whether any process got SIGTERM/SIGINT (on several processes, an all-reduce each step: a
    fine-tune's steps are few and long, so one small collective per step costs nothing)."""
    if accelerator.num_processes == 1:
        return signum is not None
    flag = torch.tensor([1.0 if signum is not None else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _interrupt(t: Finetuner, folder: Path, log: Path, seconds: float, signum: int | None) -> None:
    signum = signum or signal.SIGTERM  # another process got it
    saved = save_checkpoint(t.accelerator, folder, 1, t.progress.epoch, t.progress.step)
    if t.accelerator.is_main_process:
        _append(log, {"kind": "stopped", "step": t.progress.step, "seconds": seconds})
    raise TrainingInterrupted(
        f"{signal.Signals(signum).name} at step {t.progress.step}: the step finished and {saved} was written. "
        "Continue with the same twinview finetune command and --resume.",
        signum,
    )


def _append(log: Path, record: dict[str, Any]) -> None:
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _previous_seconds(log: Path, step: int) -> float:
    """Training seconds already spent by the steps a resumed fine-tune has done."""
    if step == 0 or not log.is_file():
        return 0.0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    before = [r["seconds"] for r in records if r["step"] <= step]
    return float(before[-1]) if before else 0.0


@torch.no_grad()
def predict(
    model: nn.Module,
    test_set: Dataset,
    settings: FinetuneSettings,
    accelerator: Accelerator,
    mean: Any,
    std: Any,
) -> torch.Tensor:
    """``(M, C)`` float32 logits of every test image, whole and at its loaded size, in order
    (several processes split the images; the main process gets all of them)."""
    device = accelerator.device
    loader = accelerator.prepare_data_loader(
        _loader(test_set, settings.eval_batch_size, settings.num_workers, shuffle=False, pin=device.type == "cuda")
    )
    normalize = Normalize(mean, std).to(device)
    model.to(device).eval()
    parts = []
    for images, _ in loader:
        with accelerator.autocast():
            logits = model(normalize(to_unit_float(images.to(device))))
        parts.append(accelerator.gather_for_metrics(logits.float()))
    logits = torch.cat(parts).cpu() if parts else torch.zeros(0)
    return logits if accelerator.is_main_process else torch.zeros(0)


def top_k(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of ``(M, C)`` logits against ``(M,)`` labels."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == labels).float().mean().item(), (top == labels[:, None]).any(dim=1).float().mean().item()
