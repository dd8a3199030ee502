"""Training methods: backbone + head (the trained model) composed with a loss and any extra state.

A method is a small module called once per forward pass, ``method(model, views, labels) -> loss``,
which is ``loss(embed(model, views), keys(views), labels)``: ``embed`` is the path with gradient
(the trained model), ``keys`` the path without (MoCo's momentum encoder), ``loss`` the objective on
their outputs. Gradient accumulation in ``cached`` mode (twinview.pretrain.engine.accumulation) calls the
three parts itself, so the loss sees every pass of an optimiser step at once. Then
``method.after_step(online, step, total_steps, apply)`` after the optimiser step (``apply``: None, or
a 0-dim bool flag on the device that is False for a skipped non-finite step). Its state (the MoCo
momentum encoder and queue) is checkpointed with the run. Selected by ``objective.name``:

* ``simclr``: NT-Xent over two views, negatives from every process.
* ``moco_v2``: query encoder vs momentum key encoder, InfoNCE against a queue of keys, keys
  encoded with shuffle BN (several processes) or split BN (one process).
* ``moco_v3``: a predictor on the query branch, symmetric InfoNCE against the in-batch keys of
  every process, no queue (works with ViTs as with ResNets).
* ``supcon``, ``triplet``, ``contrastive``: supervised metric learning on class-labelled folders
  (batches come from a P x K class-balanced sampler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twinview.pretrain import distributed
from twinview.pretrain.config import Config
from twinview.pretrain.objectives.losses import info_nce, nt_xent, pairwise_contrastive, supcon, triplet
from twinview.pretrain.distributed import to_device_async
from twinview.pretrain.objectives.moco import KeyQueue, MomentumEncoder, cosine_momentum, encode_keys_without_bn_leak

SUPERVISED = ("supcon", "triplet", "contrastive")


def _two(model: nn.Module, views: list[torch.Tensor], **kwargs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views through the model in one call (one batch-norm batch, one DDP forward)."""
    return model(torch.cat(views[:2]), **kwargs).chunk(2)  # (N, D) each


class Method(nn.Module):
    """The shared shape of a method; the defaults fit the objectives without a momentum encoder:
    both views through the model, no keys, nothing to update after the step."""

    def embed(self, model: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(_two(model, views))  # z_a, z_b: (N, D)

    def keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return []

    def loss(self, outputs: list[torch.Tensor], keys: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.embed(model, views), self.keys(views), labels)

    def after_step(self, online: nn.Module, step: int, total_steps: int, apply: torch.Tensor | None = None) -> None:
        """Nothing to update."""


class SimCLR(Method):
    """NT-Xent over two views (Chen et al. 2020)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def loss(self, outputs: list[torch.Tensor], keys: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs
        return nt_xent(z_a, z_b, self.temperature)


class MoCo(Method):
    """MoCo v2 (queue, asymmetric by default) or v3 (predictor, symmetric, in-batch keys)."""

    def __init__(self, online: nn.Module, cfg: Config, version: int) -> None:
        """Args: online: the unwrapped trained model (backbone + head [+ predictor]); cfg: the run
        config; version: 2 or 3."""
        super().__init__()
        o = cfg.objective
        self.version, self.temperature, self.symmetric = version, o.temperature, o.symmetric or version == 3
        self.momentum, self.schedule, self.bn_splits = o.momentum, o.momentum_schedule, o.bn_splits
        self.key = MomentumEncoder(nn.Sequential(online.backbone, online.head))
        self.queue = KeyQueue(o.queue_size, cfg.model.proj_dim, seed=cfg.train.seed) if version == 2 else None
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 17)  # shuffle-BN permutations

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        state = super().state_dict(*args, **kwargs)
        state["shuffle_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[no-untyped-def]
        state = dict(state)
        self.generator.set_state(state.pop("shuffle_generator"))
        return super().load_state_dict(state, strict)

    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        if self.version == 3:  # MoCo v3 encodes keys on the whole batch (the paper uses no shuffle BN)
            return self.key(images)
        return encode_keys_without_bn_leak(self.key.encoder, images, self.bn_splits, self.generator)

    def embed(self, model: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Queries: v3's predictions of both views, v2's projections of one view (both if symmetric)."""
        if self.version == 3:
            return list(_two(model, views, predict=True))  # q_a, q_b: (N, D)
        return list(_two(model, views)) if self.symmetric else [model(views[0])]

    def keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Momentum-encoder keys, no gradient: of both views (v3, symmetric v2) or of the second."""
        if self.version == 3 or self.symmetric:
            return [self._keys(views[0]), self._keys(views[1])]  # k_a, k_b
        return [self._keys(views[1])]

    def loss(self, outputs: list[torch.Tensor], keys: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE; v2 then adds this step's keys to the queue."""
        if self.version == 3:
            (q_a, q_b), (k_a, k_b) = outputs, keys
            # in-batch keys of every process are the negatives; x 2t as in the paper's code
            loss = _in_batch_info_nce(q_a, k_b, self.temperature) + _in_batch_info_nce(q_b, k_a, self.temperature)
            return loss * 2 * self.temperature
        negatives = self.queue.keys.clone()
        if self.symmetric:
            (q_a, q_b), (k_a, k_b) = outputs, keys
            loss = (info_nce(q_a, k_b, negatives, self.temperature) + info_nce(q_b, k_a, negatives, self.temperature)) / 2
            self.queue.enqueue(torch.cat([k_a, k_b]))
            return loss
        (q,), (k,) = outputs, keys
        loss = info_nce(q, k, negatives, self.temperature)
        self.queue.enqueue(k)
        return loss

    def after_step(self, online: nn.Module, step: int, total_steps: int, apply: torch.Tensor | None = None) -> None:
        """The momentum update of the key encoder (cosine-scheduled to 1 when configured); none where
        ``apply`` is False."""
        m = cosine_momentum(self.momentum, 1.0, step, total_steps) if self.schedule == "cosine" else self.momentum
        self.key.update(nn.Sequential(online.backbone, online.head), m, apply)


def _in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss: query i's positive is key i; the other keys of every process are negatives."""
    q = F.normalize(q.float(), dim=1)  # (N, D)
    k_all = F.normalize(distributed.gather(k.float()), dim=1)  # (M, D), no gradient (momentum keys)
    targets = torch.arange(q.shape[0], device=q.device) + distributed.rank() * q.shape[0]
    return F.cross_entropy(q @ k_all.T / temperature, targets)


class Supervised(Method):
    """Metric learning on labels: SupCon, triplet with online mining, or margin contrastive pairs."""

    def __init__(self, cfg: Config, seed: int) -> None:
        super().__init__()
        o = cfg.objective
        self.name, self.temperature, self.margin, self.mining = o.name, o.temperature, o.margin, o.mining
        self.generator = torch.Generator().manual_seed(seed + 29)  # pair sampling (contrastive)

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return {"pair_generator": self.generator.get_state()}

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[no-untyped-def]
        self.generator.set_state(state["pair_generator"])

    def loss(self, outputs: list[torch.Tensor], keys: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs
        if self.name == "supcon":
            return supcon(torch.cat([z_a, z_b]), labels.repeat(2), self.temperature)
        if self.name == "triplet":
            return triplet(F.normalize(torch.cat([z_a, z_b]).float(), dim=1), labels.repeat(2), self.margin, self.mining)
        # contrastive: for each first view, one similar pair (a same-class second view) and one
        # dissimilar pair (a second view of another class), drawn at random on the device
        a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
        same = labels[:, None] == labels[None, :]
        scores = to_device_async(torch.rand(same.shape, generator=self.generator), a.device)
        positive = scores.masked_fill(~same, -1.0).argmax(dim=1)  # itself at worst
        negative = scores.masked_fill(same, -1.0).argmax(dim=1)
        y = torch.cat([torch.zeros_like(labels), torch.ones_like(labels)])
        return pairwise_contrastive(torch.cat([a, a]), torch.cat([b[positive], b[negative]]), y, self.margin)


def create_method(cfg: Config, online: nn.Module) -> Method:
    """The method that ``objective.name`` selects, built around the unwrapped trained model."""
    name = cfg.objective.name
    if name == "simclr":
        return SimCLR(cfg.objective.temperature)
    if name in ("moco_v2", "moco_v3"):
        return MoCo(online, cfg, version=int(name[-1]))
    if name in SUPERVISED:
        return Supervised(cfg, cfg.train.seed)
    raise ValueError(f"unknown objective.name '{name}'")
