"""What a run writes as it goes: ``RUN_DIR/metrics.jsonl`` (and Accelerate's trackers), the
per-interval sums behind each record, and the list of files that could not be decoded."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from twinview.evaluate.progress import Progress
from twinview.pretrain.config import Config
from twinview.pretrain.data.folder import SkipLog
from twinview.pretrain.distributed import gather_objects, synchronize
from twinview.pretrain.engine.step_guard import StepGuard

SKIPPED_FILE = "skipped_files.txt"
SLOW_STEP_S = 1.0  # a second step this slow is worth an estimate at once; faster ones wait for a log point


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
            numbers = {
                f"{record['kind']}/{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
            self.accelerator.log(numbers, step=int(record["step"]))


class Window:
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


def report_skipped(run_dir: Path, accelerator: Accelerator, skip_log: SkipLog, epoch: int) -> int:
    """Merges every process's skipped files into ``RUN_DIR/skipped_files.txt``; returns the count.

    Each process reads its own skip log and the lists are gathered (a collective), so nodes that do
    not share a disk with the main one are counted too.
    """
    parts = gather_objects(skip_log.collect())
    if not accelerator.is_main_process:
        return 0
    found: dict[str, str] = {}
    for part in parts:
        assert isinstance(part, dict)
        for name, reason in part.items():
            found.setdefault(name, reason)
    if found:
        (run_dir / SKIPPED_FILE).write_text("".join(f"{name}\t{reason}\n" for name, reason in sorted(found.items())))
        accelerator.print(
            f"epoch {epoch}: {len(found)} file(s) could not be decoded and were skipped; "
            f"see {run_dir / SKIPPED_FILE} (data.strict=true stops at the first one instead)."
        )
    return len(found)


def flat_hyperparameters(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat ``section.key`` scalars (trackers take flat hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_hyperparameters(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class TrainingLog:
    """The loop's reporting: progress (a bar on a terminal, plain lines in a log file), a ``step``
    record every ``train.log_every`` steps and an ``epoch`` record per epoch, and the estimate of
    the run's time once its second step has ended. Sums stay on the device between log points; a
    log point is the loop's host sync, where the processes also agree on a stop signal one of them
    got."""

    def __init__(
        self,
        accelerator: Accelerator,
        metrics: MetricsLog,
        guard: StepGuard,
        optimizer: torch.optim.Optimizer,
        images_per_step: int,
        log_every: int,
        max_nonfinite_steps: int,
        estimate: Callable[[float], list[str]] | None = None,
    ) -> None:
        """Args (besides the obvious):
        estimate: Seconds per step -> the lines that say how long the run will take (printed once,
            on the main process).
        """
        self.accelerator, self.metrics, self.guard, self.optimizer = accelerator, metrics, guard, optimizer
        self.images_per_step, self.log_every, self.max_nonfinite_steps = (
            images_per_step,
            max(1, log_every),
            max_nonfinite_steps,
        )
        self.skipped_total = self.skipped_before = guard.read_and_reset()[0] if guard.mode != "off" else 0
        self.window = Window(accelerator.device, time.perf_counter())
        self.bar: Progress | None = None
        self.estimate = estimate
        self.steps_run = 0  # optimiser steps this process has run since the start (or the resume)
        self.first_step_end = 0.0

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        """``done`` of the epoch's ``steps`` were run before a resume."""
        self.window = Window(self.accelerator.device, time.perf_counter())
        self.epoch, self.steps, self.done = epoch, steps, done
        self.loss_sum, self.good = 0.0, 0.0
        self.start = time.perf_counter()
        self.bar = Progress(
            steps, f"epoch {epoch + 1}/{epochs}", unit="steps", initial=done, enabled=self.accelerator.is_main_process
        )

    def add(self, loss: torch.Tensor, ok: torch.Tensor, norm: torch.Tensor | None) -> None:
        self.window.add(loss, ok, norm)
        assert self.bar is not None
        self.bar.update(1)
        self.steps_run += 1
        if self.estimate is not None and self.steps_run <= 2:
            self._time_first_steps()

    def _time_first_steps(self) -> None:
        """The second step's time, as soon as it is known (one device sync after each of the first
        two steps): the first one pays the warm-up (and compilation), the second is a typical step.
        A fast step is estimated at the first log point instead, from more steps."""
        synchronize(self.accelerator.device)
        now = time.perf_counter()
        if self.steps_run == 1:
            self.first_step_end = now
        elif now - self.first_step_end >= SLOW_STEP_S:
            self._print_estimate(now - self.first_step_end)

    def _print_estimate(self, per_step: float) -> None:
        if self.estimate is not None and self.bar is not None:
            for line in self.estimate(per_step):
                self.bar.write(line)  # on its own line, above a terminal's bar (main process only)
        self.estimate = None  # once

    def due(self, step: int, stop_requested: bool) -> bool:
        """Whether ``step`` is a log point: every ``log_every`` steps, at the end of the epoch, when
        a run of skipped steps is known to be too long, or on a signal (one process)."""
        too_many = self.guard.mode == "sync" and self.guard.host_run >= self.max_nonfinite_steps
        alone = self.accelerator.num_processes == 1
        return (
            self.window.steps == self.log_every
            or step == (self.epoch + 1) * self.steps
            or too_many
            or (stop_requested and alone)
        )

    def flush(self, step: int, stop_requested: bool) -> tuple[int, bool]:
        """Writes a ``step`` record; returns (the longest run of skipped steps since the last log
        point, whether any process got a stop signal)."""
        loss_sum, good, norm_sum, norm_count, stop_votes = self.accelerator.reduce(
            self.window.vector(stop_requested), "sum"
        ).tolist()
        self.skipped_total, worst_run = self.guard.read_and_reset() if self.guard.mode != "off" else (0, 0)
        now = time.perf_counter()
        rate = self.window.steps * self.images_per_step / (now - self.window.start)
        lr = self.optimizer.param_groups[0]["lr"]
        mean_loss = loss_sum / good if good else None
        assert self.bar is not None
        self.bar.set_postfix(
            loss=f"{mean_loss:.4f}" if mean_loss is not None else "nan", lr=f"{lr:.4g}", img_s=f"{rate:.0f}"
        )
        record: dict[str, Any] = {
            "kind": "step",
            "epoch": self.epoch + 1,
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "images_per_s": rate,
        }
        if norm_count:
            record["grad_norm"] = norm_sum / norm_count
        if self.guard.mode != "off":
            record["skipped_steps"] = self.skipped_total
        self.metrics.write(record)
        if self.estimate is not None and self.steps_run >= 2 and not stop_votes:
            # fast steps: estimated here, from every step after the first
            self._print_estimate((now - self.first_step_end) / (self.steps_run - 1))
        self.loss_sum, self.good = self.loss_sum + loss_sum, self.good + good
        self.window.reset(now)
        if worst_run >= self.max_nonfinite_steps > 0 or stop_votes:
            self.bar.close()
        return worst_run, bool(stop_votes)

    def end_epoch(self, step: int) -> dict[str, Any]:
        """The ``epoch`` record (written by the caller, after the monitor adds to it)."""
        assert self.bar is not None
        self.bar.close()
        seconds = time.perf_counter() - self.start
        mean = self.loss_sum / self.good if self.good else float("nan")
        if self.guard.mode == "off" and not math.isfinite(mean):
            raise FloatingPointError(f"loss became {mean} in epoch {self.epoch + 1}; lower optim.lr.")
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": self.epoch + 1,
            "step": step,
            "loss": mean if self.good else None,
            "seconds": seconds,
            "images_per_s": (self.steps - self.done) * self.images_per_step / seconds,
        }
        if self.guard.mode != "off":
            record["skipped_steps"] = self.skipped_total - self.skipped_before
            self.skipped_before = self.skipped_total
        return record


def run_record(cfg: Config, peak_lr: float, global_batch: int) -> dict[str, Any]:
    """The ``run`` record that opens ``metrics.jsonl``: the learning rate and batch the run trains with."""
    return {
        "kind": "run",
        "peak_lr": peak_lr,
        "lr_scaling": cfg.optim.lr_scaling,
        "global_batch": global_batch,
        "grad_accumulation": cfg.train.grad_accumulation,
    }
