"""Gradient accumulation: several forward/backward passes per optimiser step.

``train.grad_accumulation_mode``:

* ``cached`` (default), after GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
  Size under Memory Limited Setup"): every pass is first run without gradient to get its
  embeddings (and MoCo keys); the loss is computed once on all of them, so NT-Xent, SupCon, MoCo
  v3, triplet mining and pair sampling see the whole accumulated batch, exactly as one big batch
  would; its gradient with respect to the embeddings is then pushed through each pass again, with
  gradient. Costs one extra forward pass per pass; memory holds one pass's activations plus the
  views and embeddings of all passes. Batch norm still normalises within a pass (as it does within
  a process), its running statistics are updated once per pass, and dropout masks are replayed.
* ``independent``: each pass computes its own loss on its own images and the gradients are
  averaged. In-batch negatives, positives and mined triplets then come from one pass only.

Both keep DDP's gradient all-reduce for the last pass of a step (``accelerator.no_sync``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

Pass = tuple[list[torch.Tensor], torch.Tensor]  # the views (each (B, 3, S, S)) and labels (B,) of one pass


class Accumulator:
    """Collects the passes of one optimiser step and runs their backward.

    ``add(views, labels)`` per pass (the ``independent`` mode runs it at once; ``done`` counts the
    passes added); ``finish()`` after the last one returns the step's loss (detached, on the device).
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, method: nn.Module, passes: int, mode: str) -> None:
        if mode not in ("cached", "independent"):
            raise ValueError(f"unknown grad accumulation mode '{mode}'")
        self.accelerator, self.model, self.method, self.passes = accelerator, model, method, passes
        self.cached = mode == "cached" and passes > 1
        self.pending: list[Pass] = []  # cached mode: the passes of this step
        self.done = 0
        self.loss_sum = torch.zeros(())  # independent mode: the passes' losses

    def add(self, views: list[torch.Tensor], labels: torch.Tensor) -> None:
        self.done += 1
        if self.cached:
            self.pending.append((views, labels))
            return
        with self._sync_if(self.done == self.passes):
            with self.accelerator.autocast():  # also the MoCo key encoder, which is not a prepared model
                loss = self.method(self.model, views, labels)
            self.accelerator.backward(loss / self.passes if self.passes > 1 else loss)
        self.loss_sum = loss.detach() if self.done == 1 else self.loss_sum + loss.detach()

    def full(self) -> bool:
        return self.done == self.passes

    def finish(self) -> torch.Tensor:
        """Backward of a cached step (if any); the step's loss. Resets for the next step."""
        if self.cached:
            loss = self._cached_backward()
        else:
            loss = self.loss_sum / self.passes if self.passes > 1 else self.loss_sum
        self.pending, self.done = [], 0
        return loss

    def _sync_if(self, last: bool) -> Any:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _cached_backward(self) -> torch.Tensor:
        buffers = list(self.model.buffers())
        before = [b.clone() for b in buffers]
        rng, outputs, keys = [], [], []
        with torch.no_grad():  # 1. embeddings and keys of every pass, no activations kept
            for views, _ in self.pending:
                rng.append(_rng_state())
                with self.accelerator.autocast():
                    outputs.append(self.method.embed(self.model, views))
                    keys.append(self.method.keys(views))
        after = _rng_state()
        if buffers:  # the second forward of each pass updates the batch-norm statistics, once
            torch._foreach_copy_(buffers, before)

        # 2. the loss on the whole accumulated batch, and its gradient w.r.t. the embeddings
        leaves = [torch.cat(parts).requires_grad_() for parts in zip(*outputs)]  # (k * B, D) each
        all_keys = [torch.cat(parts) for parts in zip(*keys)]
        labels = torch.cat([lab for _, lab in self.pending])
        with self.accelerator.autocast():
            loss = self.method.loss(leaves, all_keys, labels)
        self.accelerator.backward(loss)  # (scaled under fp16; the scale flows on to the weights)
        grads = [leaf.grad.split([o[j].shape[0] for o in outputs]) for j, leaf in enumerate(leaves)]

        # 3. each pass again, with gradient, fed the cached gradient of its embeddings
        for i, (views, _) in enumerate(self.pending):
            _set_rng_state(rng[i])  # the same dropout / drop-path masks as in step 1
            with self._sync_if(i == len(self.pending) - 1):
                with self.accelerator.autocast():
                    out = self.method.embed(self.model, views)
                torch.autograd.backward(out, [g[i] for g in grads])
        _set_rng_state(after)
        return loss.detach()


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global CPU and CUDA generators' states (reading them does not sync the device)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
