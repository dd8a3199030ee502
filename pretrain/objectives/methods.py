"""Training methods: backbone + head (the trained model) composed with a loss and its own state.

Each class here is one entry of the objective registry (twinview.pretrain.objectives.registry),
built as ``Method(section, online, seed)`` from its config section ``objective.<name>``, the
unwrapped trained model and the run's seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twinview.pretrain import distributed
from twinview.pretrain.config import Config, objective_section
from twinview.pretrain.distributed import to_device_async
from twinview.pretrain.models import ContrastiveModel
from twinview.pretrain.objectives.losses import (
    barlow_twins,
    dino,
    info_nce,
    multi_positive_nt_xent,
    negative_cosine,
    nt_xent,
    pairwise_contrastive,
    supcon,
    triplet,
    vicreg,
)
from twinview.pretrain.objectives.moco import KeyQueue, MomentumEncoder, cosine_momentum, encode_keys_without_bn_leak
from twinview.pretrain.objectives.registry import (
    BarlowTwinsConfig,
    BYOLConfig,
    ContrastiveConfig,
    DINOConfig,
    MoCoV2Config,
    MoCoV3Config,
    SimCLRConfig,
    SimSiamConfig,
    SupConConfig,
    TripletConfig,
    VICRegConfig,
    get,
)

Tensors = list[torch.Tensor]


def _two(model: nn.Module, views: Tensors, **kwargs: bool) -> Tensors:
    """Both views through the model in one call (one batch-norm batch, one DDP forward)."""
    return list(model(torch.cat(views[:2]), **kwargs).chunk(2))  # z_a, z_b: (N, D) each


def _with_locals(model: nn.Module, first: Tensors, locals_: Tensors, **kwargs: bool) -> Tensors:
    """Views at two resolutions through the model in one call (one DDP forward): ``first`` (the
    global views) as one backbone batch, the multi-crop local views as another."""
    out = model([torch.cat(first), torch.cat(locals_)], **kwargs)  # ((G + L) * N, D)
    return list(out.chunk(len(first) + len(locals_)))  # (N, D) each, in view order


_EARLIER_ENTRIES = ("shuffle_generator", "pair_generator")


class Method(nn.Module):
    """The contract of a method, written once. The training step (twinview.pretrain.engine.train)
    calls, per optimiser step:

    0. ``start_step(step, steps_per_epoch)``: before the forward, for settings that follow a
       schedule (DINO's teacher temperature); ``step`` is the number of optimiser steps done.
    1. ``embed(model, views) -> outputs``: the path with gradient, through the trained ``model``
       (possibly DDP-wrapped): a list of ``(N, D)`` tensors (SimCLR: both views' projections).
    2. ``keys(views) -> keys``: the path without gradient (MoCo's momentum encoder): a list of
       ``(N, D)`` tensors, ``[]`` when the method has none.
    3. ``loss(outputs, keys, labels) -> scalar``: the objective. It changes no state of the
       method (it may draw from the method's own random generator). Under gradient accumulation
       in ``cached`` mode it gets every pass of the step at once: ``outputs``, ``keys`` and
       ``labels`` are the passes' tensors concatenated along the batch dimension.
    4. after the optimiser step, ``after_step(online, keys, step, total_steps, apply)``: the state
       updates (momentum encoder EMA, queue), given the unwrapped trained model, the step's keys
       (concatenated over passes as in 3), the number of optimiser steps done before this one and
       in the whole run. ``apply`` is None, or a 0-dim bool tensor on the device that is False for
       a step skipped as non-finite: the update must then leave the state unchanged, decided on
       the device (no host sync). Buffers the step changed are put back by the step guard.

    ``forward(model, views, labels)`` runs 1-3 and returns ``(loss, keys)``. The method's state
    (buffers, and anything its ``state_dict`` adds) is checkpointed with the run. The defaults
    below fit a method without a momentum encoder: both views through the model, no keys, nothing
    to update. A method with a momentum copy of backbone + head subclasses :class:`MomentumMethod`.
    """

    detached_outputs: tuple[int, ...] = ()  # indices of embed()'s outputs the loss reads only detached

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        """Nothing follows a schedule. (What this sets must be a function of its arguments only:
        it runs after the step guard's snapshot and is not checkpointed.)"""

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        return _two(model, views)

    def keys(self, views: Tensors) -> Tensors:
        return []

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model: nn.Module, views: Tensors, labels: torch.Tensor) -> tuple[torch.Tensor, Tensors]:
        outputs = self.embed(model, views)
        keys = self.keys(views)
        return self.loss(outputs, keys, labels), keys

    def after_step(
        self, online: ContrastiveModel, keys: Tensors, step: int, total_steps: int, apply: torch.Tensor | None = None
    ) -> None:
        """Nothing to update."""

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a checkpoint's method state; entries that earlier versions saved for every MoCo and every
        supervised method (a generator this method does not keep) are dropped, so those runs resume."""
        state = {k: v for k, v in state.items() if k not in _EARLIER_ENTRIES}
        return super().load_state_dict(state, strict, assign)


class SimCLR(Method):
    """NT-Xent over two views (Chen et al. 2020); with multi-crop local views, the multi-positive
    NT-Xent over all of them (every view of an image a positive of the others)."""

    def __init__(self, section: SimCLRConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.temperature = section.temperature

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        return _two(model, views) if len(views) == 2 else _with_locals(model, views[:2], views[2:])

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        if len(outputs) > 2:
            return multi_positive_nt_xent(outputs, self.temperature)
        z_a, z_b = outputs
        return nt_xent(z_a, z_b, self.temperature)


class MomentumMethod(Method):
    """A method with a momentum (EMA) copy of backbone + head: MoCo's key encoder, BYOL's target,
    DINO's teacher. Its config section has ``momentum`` (m) and ``momentum_schedule`` (``constant``,
    or ``cosine`` from m to 1 over the run, as in BYOL and MoCo v3). After each applied optimiser
    step the copy moves towards the online model: ``theta_k <- m theta_k + (1 - m) theta_q``.

    ``self.key`` is the copy (:class:`~twinview.pretrain.objectives.moco.MomentumEncoder`; called on
    images it returns outputs without gradient); subclasses define ``embed``, ``keys`` and ``loss``
    and, for more state, extend ``after_step`` (calling this one).
    """

    def __init__(self, section: Any, online: ContrastiveModel, seed: int) -> None:
        """Args: section: the objective's config section (with ``momentum``, ``momentum_schedule``);
        online: the trained model, copied; seed: the run's seed."""
        super().__init__()
        self.momentum, self.schedule = section.momentum, section.momentum_schedule
        self.key = MomentumEncoder(nn.Sequential(online.backbone, online.head))

    def momentum_at(self, step: int, total_steps: int) -> float:
        """m after ``step`` of ``total_steps`` optimiser steps."""
        return cosine_momentum(self.momentum, 1.0, step, total_steps) if self.schedule == "cosine" else self.momentum

    def after_step(
        self, online: ContrastiveModel, keys: Tensors, step: int, total_steps: int, apply: torch.Tensor | None = None
    ) -> None:
        """The momentum update of the copy (left as it is where ``apply`` is False)."""
        self.key.update(nn.Sequential(online.backbone, online.head), self.momentum_at(step, total_steps), apply)


class MoCoV2(MomentumMethod):
    """MoCo v2: InfoNCE of queries against their momentum keys and a queue of older keys; keys
    encoded with shuffle BN (several processes) or split BN (one process). Asymmetric by default.
    Multi-crop local views are extra queries, each against every global view's key (the loss is
    the mean over query-key pairs)."""

    def __init__(self, section: MoCoV2Config, online: ContrastiveModel, seed: int) -> None:
        super().__init__(section, online, seed)
        self.temperature = section.temperature
        self.symmetric, self.bn_splits = section.symmetric, section.bn_splits
        self.queue = KeyQueue(section.queue_size, online.head.out_dim, seed=seed)
        self.generator = torch.Generator().manual_seed(seed + 17)  # shuffle-BN permutations

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        state["shuffle_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        state = dict(state)
        self.generator.set_state(state.pop("shuffle_generator"))
        return super().load_state_dict(state, strict, assign)

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        """Queries: the projections of the first view (of both if symmetric), then of the local views."""
        first = views[:2] if self.symmetric else views[:1]
        if len(views) > 2:
            return _with_locals(model, first, views[2:])
        return _two(model, views) if self.symmetric else [model(views[0])]

    def keys(self, views: Tensors) -> Tensors:
        """Momentum keys, no gradient: of the second view (of both if symmetric); never of local views."""
        chosen = views[:2] if self.symmetric else views[1:2]
        return [encode_keys_without_bn_leak(self.key.encoder, v, self.bn_splits, self.generator) for v in chosen]

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        negatives = self.queue.keys.clone()  # (K, D)
        globals_ = 2 if self.symmetric else 1
        if len(outputs) > globals_:  # multi-crop
            pairs = list(zip(outputs[:globals_], keys[::-1] if self.symmetric else keys, strict=True))
            pairs += [(q, k) for q in outputs[globals_:] for k in keys]
            return sum_of(info_nce(q, k, negatives, self.temperature) for q, k in pairs) / len(pairs)
        if self.symmetric:
            (q_a, q_b), (k_a, k_b) = outputs, keys
            return (
                info_nce(q_a, k_b, negatives, self.temperature) + info_nce(q_b, k_a, negatives, self.temperature)
            ) / 2
        (q,), (k,) = outputs, keys
        return info_nce(q, k, negatives, self.temperature)

    def after_step(
        self, online: ContrastiveModel, keys: Tensors, step: int, total_steps: int, apply: torch.Tensor | None = None
    ) -> None:
        """The momentum update, then this step's keys into the queue (a skipped step's queue is
        put back by the step guard, with the other buffers)."""
        super().after_step(online, keys, step, total_steps, apply)
        self.queue.enqueue(torch.cat(keys))


class MoCoV3(MomentumMethod):
    """MoCo v3: a predictor on the query branch, symmetric InfoNCE against the in-batch momentum
    keys of every process, no queue (ViTs as well as ResNets). Multi-crop local views are extra
    queries against both global keys (the loss is then the mean over query-key pairs, scaled as
    the two-view loss is)."""

    def __init__(self, section: MoCoV3Config, online: ContrastiveModel, seed: int) -> None:
        super().__init__(section, online, seed)
        self.temperature = section.temperature

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        if len(views) > 2:
            return _with_locals(model, views[:2], views[2:], predict=True)
        return _two(model, views, predict=True)  # q_a, q_b: (N, D)

    def keys(self, views: Tensors) -> Tensors:
        return [self.key(views[0]), self.key(views[1])]  # k_a, k_b: whole-batch BN, as in the paper

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        if len(outputs) > 2:  # multi-crop
            pairs = [(outputs[0], keys[1]), (outputs[1], keys[0])] + [(q, k) for q in outputs[2:] for k in keys]
            mean = sum_of(_in_batch_info_nce(q, k, self.temperature) for q, k in pairs) / len(pairs)
            return mean * 2 * 2 * self.temperature  # two terms' worth, as below
        (q_a, q_b), (k_a, k_b) = outputs, keys
        loss = _in_batch_info_nce(q_a, k_b, self.temperature) + _in_batch_info_nce(q_b, k_a, self.temperature)
        return loss * 2 * self.temperature  # x 2t, as in the paper's code


class BYOL(MomentumMethod):
    """BYOL (Grill et al. 2020): the online branch's predictor regresses the momentum target's
    projection of the other view, both ways: ``negative_cosine(p_a, z'_b) + negative_cosine(p_b, z'_a)``
    (the paper's symmetrised loss). No negatives; the target follows the online backbone + head with
    the cosine schedule 0.996 -> 1 by default."""

    def __init__(self, section: BYOLConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__(section, online, seed)

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        return _two(model, views, predict=True)  # p_a, p_b: (N, D)

    def keys(self, views: Tensors) -> Tensors:
        return list(self.key(torch.cat(views[:2])).chunk(2))  # z'_a, z'_b: (N, D), no gradient

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        (p_a, p_b), (t_a, t_b) = outputs, keys
        return negative_cosine(p_a, t_b) + negative_cosine(p_b, t_a)


class SimSiam(Method):
    """SimSiam (Chen, He 2021): each view's prediction regresses the other view's projection behind a
    stop-gradient; no momentum encoder, no negatives. The paper's loss is ``D(p_a, z_b)/2 +
    D(p_b, z_a)/2`` with ``D = -cos``; this returns ``1 +`` that (a quarter of the two
    :func:`negative_cosine` terms), so the gradient, and the paper's learning rates, are the same."""

    detached_outputs = (2, 3)  # z_a, z_b: their gradient is zero; it reaches the model through p

    def __init__(self, section: SimSiamConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        out = model(torch.cat(views[:2]), predict=True, projections=True)  # (4N, D): p_a, p_b, z_a, z_b
        return list(out.chunk(4))

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        p_a, p_b, z_a, z_b = outputs
        return (negative_cosine(p_a, z_b.detach()) + negative_cosine(p_b, z_a.detach())) / 4


class BarlowTwins(Method):
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' batch-normalised
    projections, over the global batch, pushed to the identity (:func:`barlow_twins`)."""

    def __init__(self, section: BarlowTwinsConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.lambd = section.lambd

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs
        return barlow_twins(z_a, z_b, self.lambd)


class VICReg(Method):
    """VICReg (Bardes, Ponce, LeCun 2022): invariance between the views' projections, variance and
    covariance of each over the global batch (:func:`vicreg`)."""

    def __init__(self, section: VICRegConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.weights = (section.sim_weight, section.var_weight, section.cov_weight)

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs
        return vicreg(z_a, z_b, *self.weights)


class DINO(MomentumMethod):
    """DINO (Caron et al. 2021): the student (backbone + DINO head) matches the momentum teacher's
    centred, sharpened softmax over the prototypes of the other global view; multi-crop local views
    go through the student only. The teacher's temperature warms up linearly over
    ``warmup_teacher_epochs``; the centre follows the teacher's mean output over the global batch
    (EMA ``center_momentum``). Not done here, as in the paper's ResNet recipe: freezing the last layer
    in the first epoch and the weight-decay schedule."""

    def __init__(self, section: DINOConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__(section, online, seed)
        self.student_temperature = section.student_temperature
        self.final_teacher_temperature = section.teacher_temperature
        self.warmup = (section.warmup_teacher_temperature, section.warmup_teacher_epochs)
        self.start_step(0, 1)  # the temperature of the first step until the loop says otherwise
        self.center_momentum = section.center_momentum
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(1, section.prototypes))

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        """The teacher temperature of this step: linear from the warm-up value over the warm-up epochs."""
        start, epochs = self.warmup
        progress = step / max(1, steps_per_epoch) / epochs if epochs > 0 else 1.0
        self.teacher_temperature = start + (self.final_teacher_temperature - start) * min(progress, 1.0)

    def embed(self, model: nn.Module, views: Tensors) -> Tensors:
        return _two(model, views) if len(views) == 2 else _with_locals(model, views[:2], views[2:])

    def keys(self, views: Tensors) -> Tensors:
        return list(self.key(torch.cat(views[:2])).chunk(2))  # the teacher's (N, K) of the global views

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        return dino(outputs, keys, self.center, self.student_temperature, self.teacher_temperature)

    def after_step(
        self, online: ContrastiveModel, keys: Tensors, step: int, total_steps: int, apply: torch.Tensor | None = None
    ) -> None:
        """The teacher's momentum update, then the centre's EMA towards the teacher's mean output
        over every process (kept where ``apply`` is False)."""
        super().after_step(online, keys, step, total_steps, apply)
        with torch.no_grad():
            # every process has as many rows, so the mean of the per-process means is the global one
            mean = distributed.mean_over_processes(torch.cat(keys).float().mean(dim=0, keepdim=True))  # (1, K)
            center = self.center * self.center_momentum + mean * (1 - self.center_momentum)
            self.center.copy_(center if apply is None else torch.where(apply, center, self.center))


def sum_of(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of scalar loss terms (``sum()`` with a tensor start, for the type checker)."""
    return torch.stack(list(terms)).sum()


def _in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss: query i's positive is key i; the other keys of every process are negatives."""
    q = F.normalize(q.float(), dim=1)  # (N, D)
    k_all = F.normalize(distributed.gather(k.float()), dim=1)  # (M, D), no gradient (momentum keys)
    targets = torch.arange(q.shape[0], device=q.device) + distributed.rank() * q.shape[0]
    return F.cross_entropy(q @ k_all.T / temperature, targets)


class SupCon(Method):
    """Supervised contrastive loss over both views (Khosla et al. 2020)."""

    def __init__(self, section: SupConConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.temperature = section.temperature

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs
        return supcon(torch.cat([z_a, z_b]), labels.repeat(2), self.temperature)


class Triplet(Method):
    """Triplet margin loss with online mining over both views' L2-normalised embeddings."""

    def __init__(self, section: TripletConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.margin, self.mining = section.margin, section.mining

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat(outputs).float(), dim=1)  # (2N, D)
        return triplet(z, labels.repeat(2), self.margin, self.mining)


class Contrastive(Method):
    """The pairwise margin loss (Siamese): for each first view, one similar pair (a same-class
    second view) and one dissimilar pair (a second view of another class), drawn on the device."""

    def __init__(self, section: ContrastiveConfig, online: ContrastiveModel, seed: int) -> None:
        super().__init__()
        self.margin = section.margin
        self.generator = torch.Generator().manual_seed(seed + 29)  # pair sampling

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {"pair_generator": self.generator.get_state()}

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        self.generator.set_state(state["pair_generator"])

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        a, b = (F.normalize(z.float(), dim=1) for z in outputs)  # (N, D) each
        same = labels[:, None] == labels[None, :]
        scores = to_device_async(torch.rand(same.shape, generator=self.generator), a.device)
        positive = scores.masked_fill(~same, -1.0).argmax(dim=1)  # itself at worst
        negative = scores.masked_fill(same, -1.0).argmax(dim=1)
        y = torch.cat([torch.zeros_like(labels), torch.ones_like(labels)])
        return pairwise_contrastive(torch.cat([a, a]), torch.cat([b[positive], b[negative]]), y, self.margin)


def create_method(cfg: Config, online: ContrastiveModel) -> Method:
    """The method of ``objective.name`` (its registry entry), built from its config section around
    the unwrapped trained model."""
    entry = get(cfg.objective.name)
    cls = entry.method_class()
    if not issubclass(cls, Method) or entry.momentum != issubclass(cls, MomentumMethod):
        raise TypeError(
            f"objective '{entry.name}': {entry.method} must subclass Method, and MomentumMethod exactly when its "
            f"registry entry says momentum=True (it says {entry.momentum})."
        )
    method: Method = cls(objective_section(cfg), online, cfg.train.seed)
    return method
