"""MoCo's parts: a momentum (EMA) key encoder, a queue of negative keys, and BN-leak-free key encoding.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020); Chen
et al., "Improved Baselines with Momentum Contrastive Learning" (2020); Chen, Xie, He, "An
Empirical Study of Training Self-Supervised Vision Transformers" (ICCV 2021).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twinview.pretrain import distributed


class MomentumEncoder(nn.Module):
    """A frozen copy of an encoder that follows it by an exponential moving average.

    ``update(online, m)``: ``theta_k <- m * theta_k + (1 - m) * theta_q`` for every parameter, so
    m = 0 copies the online encoder and m = 1 freezes the key encoder. Buffers (batch-norm running
    statistics) are the key encoder's own. No gradient ever reaches it.
    """

    def __init__(self, online: nn.Module) -> None:
        """Args: online: The encoder to follow (deep-copied; the copy's parameters are frozen)."""
        super().__init__()
        self.encoder = copy.deepcopy(online)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float, apply: torch.Tensor | None = None) -> None:
        """Moves each key parameter towards its online counterpart.

        Args:
            online: The online encoder.
            momentum: m of the update.
            apply: Optional 0-dim bool on the device; where False the key encoder is left as it is
                (a skipped step), decided without a host sync.
        """
        key: list[torch.Tensor] = list(self.encoder.parameters())
        query = [p.detach() for p in online.parameters()]
        if len(key) != len(query):
            raise ValueError("the momentum encoder and the online encoder have different parameters")
        if apply is None:
            torch._foreach_lerp_(key, query, 1.0 - momentum)
        else:  # lerp with weight 0 returns the key exactly; a list of tensor weights, as a single
            # tensor weight would be read on the host (a sync)
            weight = apply.to(key[0].dtype) * (1.0 - momentum)
            weights: Any = [weight] * len(key)  # tensor weights: torch's stubs list only scalars
            torch._foreach_lerp_(key, query, weights)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Key embeddings, without gradient."""
        return self.encoder(images)


def cosine_momentum(base: float, final: float, step: int, total_steps: int) -> float:
    """MoCo v3 / BYOL schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class KeyQueue(nn.Module):
    """A FIFO queue of ``size`` L2-normalised keys (a registered buffer, saved with checkpoints).

    ``enqueue`` takes this process's keys, gathers the keys of every process (so the queue is the
    same on every process), and overwrites the oldest entries, wrapping around at the end.
    """

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        """Args: size: number of keys K; dim: key width; seed: for the random initial keys."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.keys: torch.Tensor
        self.ptr: torch.Tensor
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """K, the number of keys held."""
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Adds ``(n, dim)`` keys from this process (and the same from every other process).

        The global batch must divide the queue size, so a write never straddles the end; the
        training loop checks that before any compute. The pointer stays on the device (no host
        sync): the write goes through an index computed there.
        """
        everyone = F.normalize(distributed.gather(keys.detach().float()), dim=1)  # (world * n, dim)
        rows = (self.ptr + torch.arange(everyone.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, rows, everyone.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + everyone.shape[0]) % self.size)


@torch.no_grad()
def encode_keys_without_bn_leak(
    encoder: nn.Module, images: torch.Tensor, splits: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Key embeddings whose batch-norm statistics do not come from the query's sub-batch.

    With several processes this is MoCo's shuffle BN: the key images of all processes are
    gathered, permuted (one permutation, broadcast from process 0), each process encodes its share,
    and the keys are gathered and put back in order. On one process the batch is permuted and
    encoded in ``splits`` groups, each with its own BN statistics (the split BN the MoCo authors
    recommend for one GPU), then put back in order.

    Args:
        encoder: The key encoder (in train mode, so BN uses batch statistics).
        images: ``(n, 3, H, W)`` this process's key views.
        splits: Groups for split BN on a single process (1 disables it); must divide ``n``.
        generator: Random generator for the permutation.

    Returns:
        ``(n, D)`` keys for this process's images, in their order.
    """
    n = images.shape[0]
    world = distributed.world_size()
    if world > 1:
        everyone = distributed.gather(images)  # (world * n, ...)
        perm = distributed.to_device_async(torch.randperm(everyone.shape[0], generator=generator), images.device)
        distributed.broadcast(perm)
        mine = perm[distributed.rank() * n : (distributed.rank() + 1) * n]
        keys = distributed.gather(encoder(everyone[mine]))  # keys of everyone[perm]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        start = distributed.rank() * n
        return keys[inverse[start : start + n]]
    if splits <= 1:
        return encoder(images)
    if n % splits:
        raise ValueError(f"objective.bn_splits={splits} must divide the per-process batch ({n}).")
    perm = distributed.to_device_async(torch.randperm(n, generator=generator), images.device)
    keys = torch.cat([encoder(chunk) for chunk in images[perm].chunk(splits)])
    out = torch.empty_like(keys)
    out[perm] = keys
    return out
