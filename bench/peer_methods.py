"""lightly's implementations of the self-supervised methods, as plain PyTorch loops, for the
side-by-side benchmarks (``bench/methods.py``, ``bench/peer_lightly.py``).

Needs lightly (never a twinview dependency), so it runs in the separate ``.venv-peer`` (see
``bench/peer_lightly.py``'s docstring). Each method follows lightly's own benchmark code for it:
``benchmarks/imagenet/resnet50/<method>.py`` in the lightly repository for the heads, the loss, the
optimiser and the schedules (lr scaled by its rule to batch 256; warm-up and cosine per step over the
run's steps, "10 of 100 epochs" read as a tenth of the run), and its CIFAR-10 benchmark
(``docs/source/getting_started/benchmarks/cifar10_benchmark.py``) where an ImageNet value makes no
sense here: blur off at 32 px, and the values tied to ImageNet's scale (1.28 M images, 500 k steps)
rather than to the image size. ResNet-18 gives 512-d features, so every head's ``input_dim`` is 512;
the hidden width of SimCLR's and MoCo v2's heads, which both papers set to the backbone's feature
width (2,048 for ResNet-50), is that width (512), as in the CIFAR-10 benchmark; the other head sizes are the
ImageNet ones. Per method (``B`` = 256, ``T`` = the run's steps):

- simclr (``simclr.py``): ``SimCLRProjectionHead(512, 512, 128)``, ``NTXentLoss(temperature=0.1)``,
  LARS lr 0.075 x sqrt(B) = 1.2, momentum 0.9, weight decay 1e-6 off norms and biases,
  ``CosineWarmupScheduler`` warm-up T/10. Views: ``SimCLRTransform`` (CIFAR-10: ``cj_strength=0.5,
  gaussian_blur=0``, the CIFAR-10 benchmark's).
- moco_v2 (``mocov2.py``): ``MoCoProjectionHead(512, 512, 128)`` (2 layers, no BN), a momentum key
  encoder (backbone + head), queries from view 1 and keys (batch-shuffled) from view 0, momentum
  update between the two, ``NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))``, SGD lr
  0.03 x B / 256 = 0.03, momentum 0.9, weight decay 1e-4 off norms and biases, cosine without
  warm-up. The ImageNet bank of 65,536 keys is 6.5x these data sets and its key momentum 0.999 would
  leave the key encoder two-thirds at its random init after 390 steps: the CIFAR-10 benchmark's
  4,096 keys and m = 0.99 instead. Views: ``MoCoV2Transform`` (CIFAR-10: no blur).
- byol (``byol.py``): ``BYOLProjectionHead(512, 4096, 256)``, ``BYOLPredictionHead(256, 4096, 256)``,
  a teacher backbone (copy) and a freshly initialised teacher projection head (as ``byol.py``),
  momentum on a cosine from 0.99 to 1 over T, updated before the step, loss ``2 x
  NegativeCosineSimilarity`` summed over both directions, LARS lr 0.45 x B / 256 = 0.45, momentum
  0.9, weight decay 1e-6 off norms and biases, warm-up T/10 then cosine. Views:
  ``BYOLTransform`` (CIFAR-10: ``gaussian_blur=0`` in both views).
- simsiam (no ImageNet file: the CIFAR-10 benchmark's ``SimSiamModel``): projection
  512 -> 2048 (BN, ReLU) -> 2048 (BN), ``SimSiamPredictionHead(2048, 512, 2048)``, loss
  0.5 x (NegCos(z0, p1) + NegCos(z1, p0)) with z detached, SGD lr 0.06 (not scaled), momentum 0.9,
  weight decay 5e-4 on everything, ``CosineAnnealingLR`` over the epochs (stepped per epoch). Views:
  ``SimSiamTransform`` (CIFAR-10: no blur).
- barlow_twins (``barlowtwins.py``): ``BarlowTwinsProjectionHead(512, 8192, 8192)``, both views in one
  forward pass, ``BarlowTwinsLoss(lambda_param=5e-3)``, LARS lr 0.2 x B / 256 for weights and
  0.0048 x B / 256 for norms and biases (no decay), weight decay 1.5e-6, momentum 0.9, warm-up T/10
  then cosine. Views: ``BYOLTransform`` (CIFAR-10: no blur).
- vicreg (``vicreg.py``): ``BarlowTwinsProjectionHead(512, 8192, 8192)``, both views in one pass,
  ``VICRegLoss()`` (25, 25, 1), LARS lr 0.2 x B / 256, momentum 0.9, weight decay 1e-6 off norms and
  biases, warm-up T/10 then cosine down to 0.01 x lr. Views: ``VICRegTransform`` (CIFAR-10: no blur).
- dino (``dino.py``): student and momentum teacher, ``DINOProjectionHead(512, 2048, 256, 2048)`` (no
  BN; the student's last layer frozen for the first epoch), ``DINOLoss(output_dim=2048)`` (teacher
  temperature 0.04, student 0.1, centre momentum 0.9), teacher momentum on a cosine from 0.996 to 1,
  SGD lr 0.03 x B / 256 = 0.03, momentum 0.9, weight decay 1e-4 off norms and biases, warm-up T/10
  then cosine, gradients clipped to norm 3 (lr and clipping as in the latest ``dino.py``). The
  ImageNet 65,536 prototypes are the CIFAR-10 benchmark's 2,048 here (10 k images). Views:
  ``DINOTransform`` with the ResNet crop scales (global 0.14-1, local 0.05-0.14), global crops at
  the protocol's crop size and local crops at 96/224 of it (14 px at 32, 27 px at 64); as many local
  views as the twinview recipe has (lightly's two benchmarks disagree: 6 on ImageNet, none on
  CIFAR-10); CIFAR-10: no blur.

Not here: MoCo v3 (lightly ships no MoCo v3 benchmark or loss). Every method scores the backbone
trained by gradient (the student, the query encoder), as twinview does.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

LIGHTLY_METHODS = ("simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg", "dino")
MISSING = {"moco_v3": "lightly has no MoCo v3 (no benchmark, loss or head for it)"}


@dataclass
class Setup:
    """What a lightly run needs from the protocol and the twinview recipe it is compared with.

    Attributes:
        train_dir: Labelled image folder (labels unused in training).
        epochs: Passes over the data.
        crop: Side of the (global) views.
        small: True at CIFAR sizes: the CIFAR-10 benchmark's settings (no blur) apply.
        backbone: A fresh backbone (the twinview recipe's, random init).
        local_crops: DINO's local views.
        batch_size: Images per step.
        workers: DataLoader workers.
        bf16: Forward passes and losses under CPU bf16 autocast.
        max_steps: Cap on steps per epoch (0: none), for smoke tests.
        seed: Seed of weights, order and views.
    """

    train_dir: Path
    epochs: int
    crop: int
    small: bool
    backbone: Callable[[], nn.Module]
    local_crops: int = 4
    batch_size: int = 256
    workers: int = 2
    bf16: bool = False
    max_steps: int = 0
    seed: int = 0


@dataclass
class Result:
    """The trained backbone and per-epoch figures."""

    backbone: nn.Module
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds_median(self) -> float:
        return statistics.median(self.seconds)


def _no_blur(small: bool) -> dict[str, Any]:
    return {"gaussian_blur": 0.0} if small else {}


def _loader(setup: Setup, transform: Any) -> torch.utils.data.DataLoader:
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(setup.train_dir), transform=transform)
    return torch.utils.data.DataLoader(
        data,
        batch_size=setup.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=setup.workers,
        persistent_workers=setup.workers > 0,
    )


def _batches(loader: torch.utils.data.DataLoader, cap: int) -> Iterator[list[torch.Tensor]]:
    for i, (views, _) in enumerate(loader):
        if cap and i >= cap:
            break
        yield views


def _steps(loader: torch.utils.data.DataLoader, setup: Setup) -> int:
    per_epoch = min(len(loader), setup.max_steps) if setup.max_steps else len(loader)
    return per_epoch * setup.epochs


def _lars(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from lightly.utils.lars import LARS

    return LARS(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _decay_groups(modules: list[nn.Module], **no_decay: Any) -> list[dict[str, Any]]:
    from lightly.models.utils import get_weight_decay_parameters

    params, plain = get_weight_decay_parameters(modules)
    return [{"params": params}, {"params": plain, "weight_decay": 0.0, **no_decay}]


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float, **kwargs: Any) -> Any:
    from lightly.utils.scheduler import CosineWarmupScheduler

    return CosineWarmupScheduler(optimizer, warmup_epochs=warmup, max_epochs=steps, **kwargs)


class _Method:
    """One lightly method: its modules, transform, optimiser, schedule and step."""

    online: list[nn.Module]  # trained by gradient (the first is the backbone that is scored)
    clip: float = 0.0
    epoch_scheduler: Any = None

    def transform(self, setup: Setup) -> Any:
        raise NotImplementedError

    def build(self, setup: Setup, steps: int) -> None:
        raise NotImplementedError

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, epoch: int) -> None:
        """Between backward and the optimiser step."""

    def train(self) -> None:
        for m in self.online:
            m.train()


class SimCLR(_Method):
    def transform(self, setup: Setup) -> Any:
        from lightly.transforms import SimCLRTransform

        small = {"cj_strength": 0.5, "gaussian_blur": 0.0} if setup.small else {}
        return SimCLRTransform(input_size=setup.crop, **small)

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = SimCLRProjectionHead(input_dim=self.dim, hidden_dim=self.dim, output_dim=128)
        self.online = [self.backbone, self.head]
        self.criterion = NTXentLoss(temperature=0.1)
        self.optimizer = _lars(_decay_groups(self.online), 0.075 * math.sqrt(setup.batch_size), 1e-6)
        self.scheduler = _warmup_cosine(self.optimizer, steps, steps / 10)

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        x0, x1 = views
        return self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))


class MoCoV2(_Method):
    def transform(self, setup: Setup) -> Any:
        from lightly.transforms import MoCoV2Transform

        return MoCoV2Transform(input_size=setup.crop, **_no_blur(setup.small))

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = MoCoProjectionHead(input_dim=self.dim, hidden_dim=self.dim, output_dim=128)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        deactivate_requires_grad(self.key_backbone)
        deactivate_requires_grad(self.key_head)
        self.online = [self.backbone, self.head]
        self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
        self.optimizer = torch.optim.SGD(
            _decay_groups(self.online), lr=0.03 * setup.batch_size / 256, momentum=0.9, weight_decay=1e-4
        )
        self.scheduler = _warmup_cosine(self.optimizer, steps, 0)

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum

        query = self.head(self.backbone(views[1]))
        update_momentum(self.backbone, self.key_backbone, m=0.99)
        update_momentum(self.head, self.key_head, m=0.99)
        with torch.no_grad():
            x, idx = batch_shuffle(views[0])
            key = batch_unshuffle(self.key_head(self.key_backbone(x)), idx)
        return self.criterion(query, key)

    def train(self) -> None:
        super().train()
        self.key_backbone.train()
        self.key_head.train()


def _byol_views(setup: Setup) -> Any:
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=setup.crop, **_no_blur(setup.small)),
        view_2_transform=BYOLView2Transform(input_size=setup.crop, **_no_blur(setup.small)),
    )


class BYOL(_Method):
    def transform(self, setup: Setup) -> Any:
        return _byol_views(setup)

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = BYOLProjectionHead(input_dim=self.dim, hidden_dim=4096, output_dim=256)
        self.predictor = BYOLPredictionHead(input_dim=256, hidden_dim=4096, output_dim=256)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_head = BYOLProjectionHead(input_dim=self.dim, hidden_dim=4096, output_dim=256)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.online = [self.backbone, self.head, self.predictor]
        self.criterion = NegativeCosineSimilarity()
        self.optimizer = _lars(_decay_groups(self.online), 0.45 * setup.batch_size / 256, 1e-6)
        self.scheduler = _warmup_cosine(self.optimizer, steps, int(steps / 10))
        self.total = steps

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, self.total, 0.99, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=m)
        update_momentum(self.head, self.teacher_head, m=m)
        with torch.no_grad():
            t0, t1 = (self.teacher_head(self.teacher_backbone(v)) for v in views)
        p0, p1 = (self.predictor(self.head(self.backbone(v))) for v in views)
        return 2 * self.criterion(t0, p1) + 2 * self.criterion(t1, p0)

    def train(self) -> None:
        super().train()
        self.teacher_backbone.train()
        self.teacher_head.train()


class SimSiam(_Method):
    def transform(self, setup: Setup) -> Any:
        from lightly.transforms import SimSiamTransform

        return SimSiamTransform(input_size=setup.crop, **_no_blur(setup.small))

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead
        from lightly.models.modules.heads import ProjectionHead

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = ProjectionHead(
            [(self.dim, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)), (2048, 2048, nn.BatchNorm1d(2048), None)]
        )
        self.predictor = SimSiamPredictionHead(2048, 512, 2048)
        self.online = [self.backbone, self.head, self.predictor]
        self.criterion = NegativeCosineSimilarity()
        params = [p for m in self.online for p in m.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)
        self.scheduler = None
        self.epoch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, setup.epochs)

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        z0, z1 = (self.head(self.backbone(v)) for v in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        z0, z1 = z0.detach(), z1.detach()
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


class BarlowTwins(_Method):
    def transform(self, setup: Setup) -> Any:
        return _byol_views(setup)

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = BarlowTwinsProjectionHead(self.dim, 8192, 8192)
        self.online = [self.backbone, self.head]
        self.criterion = BarlowTwinsLoss(lambda_param=5e-3)
        factor = setup.batch_size / 256
        groups = _decay_groups(self.online, lr=0.0048 * factor)
        self.optimizer = _lars(groups, 0.2 * factor, 1.5e-6)
        self.scheduler = _warmup_cosine(self.optimizer, steps, int(steps / 10))

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        z0, z1 = self.head(self.backbone(torch.cat(views))).chunk(2)
        return self.criterion(z0, z1)


class VICReg(_Method):
    def transform(self, setup: Setup) -> Any:
        from lightly.transforms import VICRegTransform

        return VICRegTransform(input_size=setup.crop, **_no_blur(setup.small))

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import VICRegLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        self.backbone = setup.backbone()
        self.dim = self.backbone.num_features
        self.head = BarlowTwinsProjectionHead(self.dim, 8192, 8192)
        self.online = [self.backbone, self.head]
        self.criterion = VICRegLoss()
        self.optimizer = _lars(_decay_groups(self.online), 0.2 * setup.batch_size / 256, 1e-6)
        self.scheduler = _warmup_cosine(self.optimizer, steps, steps / 10, end_value=0.01)

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        z0, z1 = self.head(self.backbone(torch.cat(views))).chunk(2)
        return self.criterion(z_a=z0, z_b=z1)


class DINO(_Method):
    clip = 3.0

    def transform(self, setup: Setup) -> Any:
        from lightly.transforms import DINOTransform

        return DINOTransform(
            global_crop_size=setup.crop,
            global_crop_scale=(0.14, 1.0),
            local_crop_size=round(setup.crop * 96 / 224),
            local_crop_scale=(0.05, 0.14),
            n_local_views=setup.local_crops,
            **({"gaussian_blur": (0.0, 0.0, 0.0)} if setup.small else {}),
        )

    def build(self, setup: Setup, steps: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = setup.backbone()  # the student
        self.dim = self.backbone.num_features
        self.head = DINOProjectionHead(self.dim, 2048, 256, 2048, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_head = DINOProjectionHead(self.dim, 2048, 256, 2048)
        self.teacher_head.load_state_dict(self.head.state_dict())  # dino.py deep-copies the head
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.online = [self.backbone, self.head]
        self.criterion = DINOLoss(output_dim=2048)
        self.optimizer = torch.optim.SGD(
            _decay_groups(self.online), lr=0.03 * setup.batch_size / 256, momentum=0.9, weight_decay=1e-4
        )
        self.scheduler = _warmup_cosine(self.optimizer, steps, int(steps / 10))
        self.total = steps

    def loss(self, views: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, self.total, 0.996, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=m)
        update_momentum(self.head, self.teacher_head, m=m)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:2])))
        student = [self.head(self.backbone(torch.cat(views[:2])))]
        if len(views) > 2:
            student.append(self.head(self.backbone(torch.cat(views[2:]))))
        return self.criterion(teacher.chunk(2), torch.cat(student).chunk(len(views)), epoch=epoch)

    def after_backward(self, epoch: int) -> None:
        params = [p for m in self.online for p in m.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.head.cancel_last_layer_gradients(epoch)

    def train(self) -> None:
        super().train()
        self.teacher_backbone.train()
        self.teacher_head.train()


METHODS: dict[str, type[_Method]] = {
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
}


def train_lightly(
    method: str, setup: Setup, after_epoch: Callable[[int, nn.Module], dict[str, Any]] | None = None
) -> Result:
    """Trains ``method`` with lightly's pieces; returns the gradient-trained backbone (eval mode) and
    the seconds and mean loss of each epoch. ``after_epoch(epoch, backbone)`` (e.g. a kNN monitor)
    runs outside the timed part; what it returns is kept in ``Result.extra``."""
    torch.manual_seed(setup.seed)
    m = METHODS[method]()
    loader = _loader(setup, m.transform(setup))
    steps = _steps(loader, setup)
    m.build(setup, steps)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup.bf16 else nullcontext
    result = Result(m.online[0])
    step = 0
    for epoch in range(setup.epochs):
        start = time.perf_counter()
        m.train()
        total = torch.zeros(())
        count = 0
        for views in _batches(loader, setup.max_steps):
            with autocast():
                loss = m.loss(views, step, epoch)
            m.optimizer.zero_grad()
            loss.backward()
            m.after_backward(epoch)
            m.optimizer.step()
            if m.scheduler is not None:
                m.scheduler.step()
            total += loss.detach().float()
            count += 1
            step += 1
        if m.epoch_scheduler is not None:
            m.epoch_scheduler.step()
        result.seconds.append(time.perf_counter() - start)
        result.losses.append(total.item() / max(count, 1))
        print(
            f"lightly {method} epoch {epoch + 1}/{setup.epochs}: {result.seconds[-1]:.1f} s, "
            f"{count} steps, loss {result.losses[-1]:.4f}",
            file=sys.stderr,
            flush=True,
        )
        if after_epoch is not None:
            result.extra.append(after_epoch(epoch, m.online[0]))
    result.backbone = m.online[0].eval()
    return result
