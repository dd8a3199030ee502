"""Skipping optimiser steps whose loss or gradient is not finite, without a host sync per step.

A step is *skipped* when its loss or its global gradient norm is NaN or infinite (on any process):
the model's parameters and buffers (batch-norm statistics), the optimiser state and the method's
state (MoCo momentum encoder and queue) are left as they were before the step. The data position,
the learning-rate schedule and the random streams move on, as in ``torch.amp.GradScaler``. Skipped
steps are counted; the loop stops training after ``train.max_nonfinite_steps`` of them in a row.

``train.max_nonfinite_steps=0`` turns the check off (mode ``off``): every step is applied.
Otherwise there are two ways to apply the decision, with the same result (tested bitwise equal):

* ``sync``: the finite flag is read on the host and a bad step is not applied. On a CPU this costs
  nothing (the host has already waited for the step), so ``auto`` picks it there.
* ``device``: nothing is read on the host. Parameters and optimiser state are copied before the
  optimiser step and put back with ``torch.where(ok, new, old)`` after it; the counters stay on the
  device until the loop's next logging point, where it syncs anyway. It costs one copy and one
  select over parameters and optimiser state per step (bandwidth only) and one extra copy of them
  in memory. ``auto`` picks it on accelerators.

Under fp16 with a ``GradScaler`` only the loss is checked: the scaler already skips steps with
non-finite (scaled) gradients, which are expected while it calibrates, and should not count. The
scaler then owns the optimiser step (it reads its overflow flag on the host every step, torch's
design); the guard skips the rest (momentum update, buffers) on a non-finite loss.

Device mode needs an optimiser whose whole state is tensors on the weights' device; otherwise it
falls back to ``sync`` with a warning (torch's Adam family is built ``capturable`` on GPUs so that
its step count lives there).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class NonFiniteTraining(RuntimeError):
    """Training stopped after too many non-finite steps in a row."""


@dataclass(frozen=True)
class Decision:
    """What the training step does with one optimiser step, from :meth:`StepGuard.decide`.

    Attributes:
        ok: 0-dim bool on the device: loss and gradient norm finite on every process.
        step_optimizer: Call ``optimizer.step()``. False only for a non-finite step decided on the
            host; under a GradScaler always True (the scaler skips non-finite gradients itself).
        update_method: Call ``method.after_step`` (the momentum encoder and queue).
        apply: ``after_step``'s flag: None when the step was decided on the host, else ``ok``,
            with which the update leaves the method's state unchanged on a bad step.
        on_device: The decision was made on the device: weights, optimiser state and buffers of a
            bad step are put back with ``torch.where`` (:meth:`StepGuard.restore_weights`).
    """

    ok: torch.Tensor
    step_optimizer: bool
    update_method: bool
    apply: torch.Tensor | None
    on_device: bool


class StepGuard:
    """Decides per optimiser step whether it is finite; snapshots and restores what a skipped step changed.

    The training step calls, in order: ``snapshot_buffers()`` before the forward passes; after
    backward and clipping, ``step = decide(loss, grad_norm)``; ``optimizer.step()`` if
    ``step.step_optimizer``; ``restore_weights(step)``; ``method.after_step(..., step.apply)`` if
    ``step.update_method``; ``restore_buffers(step)``. In mode ``off`` the calls around the
    optimiser step and the update do nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        mode: str,
        device: torch.device,
        all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scaler_skips: bool = False,
    ) -> None:
        """Args:
        model: The trained model (possibly DDP-wrapped).
        method: The method whose buffers (MoCo queue, key encoder statistics) a skip restores.
        optimizer: The (possibly Accelerate-wrapped) optimiser.
        mode: ``off``, ``sync`` or ``device`` (see the module docstring).
        device: Where the counters live.
        all_reduce_min: Makes the flag agree across processes (None: one process).
        scaler_skips: A GradScaler (fp16) owns the optimiser step and skips it itself when
            the gradients are not finite; ``optimizer.step()`` is then always called, so the
            scaler's state stays consistent, and only the rest of the step is guarded.
        """
        if mode not in ("off", "sync", "device"):
            raise ValueError(f"unknown step guard mode '{mode}' (off, sync or device)")
        self.model, self.method, self.optimizer, self.mode = model, method, optimizer, mode
        self.all_reduce_min, self.scaler_skips = all_reduce_min, scaler_skips
        self.buffers = [] if mode == "off" else list(itertools.chain(model.buffers(), method.buffers()))
        self.buffer_copies = [torch.empty_like(b) for b in self.buffers]
        self.shadow: list[torch.Tensor] = []  # device mode: weights and optimiser state before the step
        self.live: list[torch.Tensor] = []  # device mode: the tensors ``shadow`` copies
        # counters: skipped steps in total, the current run of skips, the longest run since reset
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.run = torch.zeros((), dtype=torch.long, device=device)
        self.worst_run = torch.zeros((), dtype=torch.long, device=device)
        self.always_ok = torch.ones((), dtype=torch.bool, device=device)  # the flag in mode off
        self.host_run = 0  # sync mode only: the current run, known on the host without a further sync
        self._stepped = False  # device mode decides on the host until the optimiser has stepped once

    @property
    def checks_gradients(self) -> bool:
        """Whether ``decide`` wants the gradient norm (not under a GradScaler, which checks itself)."""
        return self.mode != "off" and not self.scaler_skips

    def snapshot_buffers(self) -> None:
        """Remembers the buffers the forward passes will update (batch-norm statistics, queue)."""
        if self.buffers and self.mode != "off":
            torch._foreach_copy_(self.buffer_copies, self.buffers)

    @torch.no_grad()
    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Decision:
        """Whether the step is finite on every process, and how the step is to be applied.

        Counts a bad step on the device. In device mode, also copies the weights and optimiser
        state that ``optimizer.step()`` is about to change. In sync mode (and in device mode until
        the optimiser has stepped once and created its state) the flag is read on the host.
        """
        if self.mode == "off":
            return Decision(self.always_ok, True, True, None, False)
        ok = torch.isfinite(loss.detach())
        if grad_norm is not None and self.checks_gradients:
            ok = ok & torch.isfinite(grad_norm)
        if self.all_reduce_min is not None:
            ok = self.all_reduce_min(ok.to(torch.int32)).bool()
        bad = ~ok
        self.skipped += bad
        self.run.add_(1).mul_(bad)
        torch.maximum(self.worst_run, self.run, out=self.worst_run)
        if self.mode == "device" and self._stepped:
            if not self.scaler_skips:
                self.live = [p.data for p in self._parameters()] + self._optimizer_state()
                if [t.shape for t in self.shadow] != [t.shape for t in self.live]:
                    self.shadow = [torch.empty_like(t) for t in self.live]
                torch._foreach_copy_(self.shadow, self.live)
            return Decision(ok, True, True, ok, True)
        good = bool(ok)  # host sync: free on a CPU; once per run in device mode
        return Decision(ok, good or self.scaler_skips, good, None, False)

    @torch.no_grad()
    def restore_weights(self, step: Decision) -> None:
        """Device mode: puts back the weights and optimiser state where the step was not finite
        (before the method's update, which reads the weights)."""
        if step.on_device and self.live:
            _keep_where(step.ok, self.live, self.shadow)

    @torch.no_grad()
    def restore_buffers(self, step: Decision) -> None:
        """Puts back the buffers a non-finite step changed (batch-norm statistics, MoCo queue)."""
        if self.mode == "off":
            return
        if step.on_device:
            _keep_where(step.ok, self.buffers, self.buffer_copies)
        elif step.update_method:  # a good step decided on the host
            self.host_run = 0
            if self.mode == "device" and not self._stepped:
                self._stepped = True
                self._check_device_mode(step.ok.device)
        else:
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.buffer_copies)
            self.host_run += 1

    def _check_device_mode(self, device: torch.device) -> None:
        """Falls back to ``sync`` for an optimiser whose state device mode cannot restore on the
        device: tensors on another device (e.g. torch Adam's step count on the CPU unless
        ``capturable``), or counters kept as Python numbers or in the param groups (Lamb, Adan)."""
        why = ""
        if any(t.device != device for t in self._optimizer_state()):
            why = "keeps part of its state on another device than the weights"
        elif any(
            not isinstance(v, torch.Tensor) and isinstance(v, (int, float))
            for per_param in self.optimizer.state.values()
            for v in per_param.values()
        ):
            why = "keeps counters as Python numbers"
        elif any("step" in group for group in self.optimizer.param_groups):
            why = "keeps a step counter in its param groups"
        if why and not self.scaler_skips:
            name = type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__
            warnings.warn(
                f"train.nonfinite_check=device: the optimiser {name} {why}, which a skipped step could "
                "not restore on the device; the check reads its flag on the host every step instead.",
                stacklevel=2,
            )
            self.mode = "sync"

    def read_and_reset(self) -> tuple[int, int]:
        """(skipped steps in total, longest run of skips since the last call): a host sync."""
        skipped, worst = (int(v) for v in torch.stack([self.skipped, self.worst_run]).tolist())
        self.worst_run.copy_(self.run)
        return skipped, worst

    def state_dict(self) -> dict[str, int]:
        """The counters, checkpointed with the run (a resumed run keeps counting the same run)."""
        return {"skipped": int(self.skipped), "run": int(self.run)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped.fill_(state["skipped"])
        self.run.fill_(state["run"])
        self.host_run = state["run"]
        self.worst_run.fill_(state["run"])

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _optimizer_state(self) -> list[torch.Tensor]:
        """The optimiser's tensor state (momentum buffers, Adam moments, step counters)."""
        return [
            value
            for per_param in self.optimizer.state.values()
            for value in per_param.values()
            if isinstance(value, torch.Tensor)
        ]


def _keep_where(ok: torch.Tensor, live: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """``live = ok ? live : before``, in place, decided on the device."""
    for new, old in zip(live, before, strict=True):
        torch.where(ok, new, old, out=new)


def resolve_mode(setting: str, max_nonfinite_steps: int, device: torch.device) -> str:
    """``train.nonfinite_check``: ``off`` when ``train.max_nonfinite_steps=0``; ``auto`` is ``sync``
    on a CPU (free there) and ``device`` elsewhere."""
    if max_nonfinite_steps == 0:
        return "off"
    if setting == "auto":
        return "sync" if device.type == "cpu" else "device"
    return setting


def grad_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients, on the device (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
