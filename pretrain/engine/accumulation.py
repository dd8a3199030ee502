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
  averaged. In-batch negatives, positives and mined triplets then come from one pass only. This is
  the training step's own loop (``train_step`` in train.py), of which one pass, the usual case, is
  the special case.

Both keep DDP's gradient all-reduce for the last pass of a step (:func:`gradient_sync`), and
hand the keys of every pass to ``method.after_step`` after the optimiser step (MoCo v2 enqueues
them all at once, as one big batch would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from twinview.pretrain.objectives.methods import Method

Tensors = list[torch.Tensor]
Pass = tuple[Tensors, torch.Tensor]  # the views (each (B, 3, S, S)) and labels (B,) of one pass


def gradient_sync(accelerator: Accelerator, model: nn.Module, last: bool) -> Any:
    """DDP's gradient all-reduce only in the last pass of a step (``accelerator.no_sync`` before it)."""
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def concat(parts: list[Tensors]) -> Tensors:
    """Per-pass lists of tensors -> one list, each entry concatenated over the passes."""
    return [torch.cat(entry) for entry in zip(*parts, strict=True)]


def cached_passes(
    accelerator: Accelerator, model: nn.Module, method: Method, passes: Iterable[Pass]
) -> tuple[torch.Tensor, Tensors]:
    """Forward and backward of several passes with one loss over all of them (GradCache).

    Args:
        accelerator: Runs backward (loss scaling) and autocast.
        model: The trained (possibly DDP-wrapped) model.
        method: The method (twinview.pretrain.objectives.methods.Method).
        passes: The views and labels of each pass, kept for the replay in 3.

    Returns:
        The step's loss (detached) and its keys, each concatenated over the passes, for
        ``method.after_step``.
    """
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    kept: list[Pass] = []  # every pass's views, for the replay in 3.
    rng, outputs, keys = [], [], []
    with torch.no_grad():  # 1. embeddings and keys of every pass, no activations kept
        for views, labels in passes:
            kept.append((views, labels))
            rng.append(_rng_state())
            with accelerator.autocast():
                outputs.append(method.embed(model, views))
                keys.append(method.keys(views))
    after = _rng_state()
    if buffers:  # the second forward of each pass updates the batch-norm statistics, once
        torch._foreach_copy_(buffers, before)

    # 2. the loss on the whole accumulated batch, and its gradient w.r.t. the embeddings
    leaves = [t.requires_grad_() for t in concat(outputs)]  # (k * B, D) each
    all_keys = concat(keys)
    labels = torch.cat([lab for _, lab in kept])
    with accelerator.autocast():
        loss = method.loss(leaves, all_keys, labels)
    accelerator.backward(loss)  # (scaled under fp16; the scale flows on to the weights)
    sizes = [[o[j].shape[0] for o in outputs] for j in range(len(leaves))]
    grads = [_grad(leaf, j in method.detached_outputs).split(sizes[j]) for j, leaf in enumerate(leaves)]

    # 3. each pass again, with gradient, fed the cached gradient of its embeddings
    for i, (views, _) in enumerate(kept):
        _set_rng_state(rng[i])  # the same dropout / drop-path masks as in step 1
        with gradient_sync(accelerator, model, i == len(kept) - 1):
            with accelerator.autocast():
                out = method.embed(model, views)
            torch.autograd.backward(out, [g[i] for g in grads])
    _set_rng_state(after)
    return loss.detach(), all_keys


def _grad(leaf: torch.Tensor, detached: bool) -> torch.Tensor:
    """The loss's gradient w.r.t. one cached embedding; zero for one the method declares the loss
    reads only behind a stop-gradient (SimSiam's projections, whose gradient reaches the model
    through the predictions instead)."""
    if leaf.grad is None:
        assert detached, "the loss does not depend on every embedding (Method.detached_outputs)"
        return torch.zeros_like(leaf)
    return leaf.grad


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global CPU and CUDA generators' states (reading them does not sync the device)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
