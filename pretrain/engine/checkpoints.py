"""Resumable checkpoints: what training has done so far, written atomically, read back newest first."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from twinview.pretrain.distributed import everyone
from twinview.pretrain.engine.step_guard import StepGuard
from twinview.pretrain.runs import CHECKPOINT_DIR, checkpoint_path, checkpoints


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
        if self.guard is not None and self.guard.mode != "off":
            state["nonfinite"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.guard is not None and "nonfinite" in state:
            self.guard.load_state_dict(state["nonfinite"])


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, keep: int, epoch: int, step: int | None = None, shared: bool = True
) -> Path:
    """Saves a resumable checkpoint atomically and keeps only the newest ``keep``.

    Every process writes into ``NAME.partial`` (Accelerate saves each process's random state there);
    the main process renames it once all are done, so a run killed while saving leaves no directory
    that looks like a checkpoint. With ``shared=False`` (nodes without a common disk) the other
    processes write into a temporary folder that is then deleted: the run directory is the main
    node's alone, and the checkpoint resumes only the main process's random state.
    """
    final = checkpoint_path(run_dir, epoch, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    private = None if shared or accelerator.is_main_process else Path(tempfile.mkdtemp(prefix="twinview-ckpt-"))
    accelerator.save_state(str(private or partial))
    accelerator.wait_for_everyone()
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest(accelerator: Accelerator, run_dir: Path) -> Path:
    """Loads the newest checkpoint that loads on every process; a corrupt one is reported and the
    previous one used.

    The main process lists the checkpoints and every process tries the same one (a network file
    system may show another process an older listing for a while), waiting up to ``_VISIBLE_S``
    for it to appear; all move to the previous one together if any process cannot load it.
    """
    names = [p.name for p in checkpoints(run_dir)]
    if accelerator.num_processes > 1:
        shared: list[object] = [names]
        torch.distributed.broadcast_object_list(shared, src=0)
        names = list(shared[0])  # type: ignore[call-overload]
    for name in reversed(names):
        candidate = Path(run_dir) / CHECKPOINT_DIR / name
        deadline = time.monotonic() + _VISIBLE_S
        while not candidate.is_dir() and time.monotonic() < deadline:
            time.sleep(0.5)
        error = None
        try:
            accelerator.load_state(str(candidate))
        except Exception as err:
            error = err
        if everyone(error is None, accelerator.device):
            return candidate
        accelerator.print(
            f"Checkpoint {candidate} cannot be loaded"
            + (f" ({type(error).__name__}: {error})" if error is not None else " on another process")
            + "; trying an older one."
        )
    raise FileNotFoundError(f"--resume: none of the {len(names)} checkpoints of '{run_dir}' could be loaded.")


_VISIBLE_S = 30.0  # how long a process waits for a checkpoint the main process listed
