"""Skipping non-finite steps: a skipped step is exactly a step that never ran, in both modes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

from twinview.pretrain.engine.step_guard import StepGuard, grad_norm, resolve_mode
from twinview.pretrain.objectives.moco import MomentumEncoder

BAD = {2, 3, 6}  # steps whose loss is made NaN


def _setup(optimizer_name: str) -> tuple[nn.Module, MomentumEncoder, torch.optim.Optimizer]:
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    key = MomentumEncoder(model)
    if optimizer_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    elif optimizer_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    else:  # timm optimisers that keep counters outside per-parameter tensors (group 'step', Python ints)
        opt = create_optimizer_v2(model, opt=optimizer_name, lr=0.01, weight_decay=0.05)
    return model, key, opt


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 5, generator=g) for _ in range(n)]


def _loss(model: nn.Module, key: MomentumEncoder, x: torch.Tensor, bad: bool) -> torch.Tensor:
    loss = (model(x) - key(x)).pow(2).mean() + model(x).pow(2).mean()
    return loss * float("nan") if bad else loss


def _state(model: nn.Module, key: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    opt_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in [*model.state_dict().values(), *key.state_dict().values(), *opt_state]]


def _guarded_step(
    guard: StepGuard,
    optimizer: Any,
    loss: torch.Tensor,
    norm: torch.Tensor | None,
    update: Callable[[torch.Tensor | None], None],
) -> None:
    """What the training step (train_step) does after backward and clipping."""
    step = guard.decide(loss, norm)
    if step.step_optimizer:
        optimizer.step()
    guard.restore_weights(step)
    if step.update_method:
        update(step.apply)
    guard.restore_buffers(step)


def _guarded(mode: str, optimizer_name: str, steps: int = 8) -> tuple[list[torch.Tensor], StepGuard]:
    model, key, opt = _setup(optimizer_name)
    guard = StepGuard(model, key, opt, mode, torch.device("cpu"))
    for i, x in enumerate(_batches(steps)):
        guard.snapshot_buffers()
        loss = _loss(model, key, x, bad=i in BAD)  # the forward updates batch-norm statistics, NaN included
        loss.backward()
        _guarded_step(
            guard, opt, loss, grad_norm(list(model.parameters())), lambda apply: key.update(model, 0.9, apply)
        )
        opt.zero_grad(set_to_none=True)
    return _state(model, key, opt), guard


def _reference(optimizer_name: str, steps: int = 8) -> list[torch.Tensor]:
    """The bad steps simply not run at all."""
    model, key, opt = _setup(optimizer_name)
    for i, x in enumerate(_batches(steps)):
        if i in BAD:
            continue
        _loss(model, key, x, bad=False).backward()
        opt.step()
        key.update(model, 0.9)
        opt.zero_grad(set_to_none=True)
    return _state(model, key, opt)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw", "lamb", "adabelief"])
@pytest.mark.parametrize("mode", ["sync", "device"])
def test_a_skipped_step_leaves_weights_buffers_optimizer_and_key_encoder_as_if_it_never_ran(
    mode: str, optimizer_name: str
) -> None:
    falls_back = mode == "device" and optimizer_name in ("lamb", "adabelief")
    if falls_back:  # device mode cannot restore their counters on the device: it reads the flag instead
        with pytest.warns(UserWarning, match="reads its flag on the host every step"):
            got, guard = _guarded(mode, optimizer_name)
        assert guard.mode == "sync"
    else:
        got, guard = _guarded(mode, optimizer_name)
        assert guard.mode == mode
    want = _reference(optimizer_name)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
        assert torch.isfinite(a.float()).all()
    assert guard.read_and_reset() == (3, 2)  # 3 skipped; the longest run is steps 2-3


def test_a_bad_first_step_in_device_mode_creates_no_optimizer_state() -> None:
    model, key, opt = _setup("sgd")
    guard = StepGuard(model, key, opt, "device", torch.device("cpu"))
    guard.snapshot_buffers()
    loss = _loss(model, key, _batches(1)[0], bad=True)
    loss.backward()
    _guarded_step(
        guard, guard.optimizer, loss, grad_norm(list(model.parameters())), lambda apply: key.update(model, 0.9, apply)
    )
    assert not opt.state


def test_counters_track_the_current_run_and_survive_a_checkpoint() -> None:
    model, key, opt = _setup("sgd")
    guard = StepGuard(model, key, opt, "sync", torch.device("cpu"))
    for flag in [False, False, True, False, False, False]:
        guard.snapshot_buffers()
        _guarded_step(guard, opt, torch.tensor(0.0 if flag else float("nan")), None, lambda apply: None)
    assert guard.read_and_reset() == (5, 3)
    assert guard.read_and_reset() == (5, 3)  # the run of 3 is still going
    restored = StepGuard(model, key, opt, "device", torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())
    restored.snapshot_buffers()
    _guarded_step(restored, opt, torch.tensor(float("nan")), None, lambda apply: None)
    assert restored.read_and_reset() == (6, 4)


def test_the_gradient_norm_is_the_global_l2_norm() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([4.0, 0.0])
    assert grad_norm([a, b]).item() == pytest.approx(5.0)
    b.grad[0] = float("inf")
    assert not torch.isfinite(grad_norm([a, b]))


def test_auto_mode_syncs_on_a_cpu_only_and_zero_steps_turn_the_check_off() -> None:
    assert resolve_mode("auto", 10, torch.device("cpu")) == "sync"
    assert resolve_mode("auto", 10, torch.device("cuda", 0)) == "device"
    assert resolve_mode("device", 10, torch.device("cpu")) == "device"
    assert resolve_mode("device", 0, torch.device("cuda", 0)) == "off"


def test_mode_off_applies_every_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model, nn.Module(), opt, "off", torch.device("cpu"))
    assert not guard.checks_gradients
    model(torch.ones(1, 4)).sum().backward()
    before = model.weight.detach().clone()
    calls: list[object] = []
    guard.snapshot_buffers()
    _guarded_step(guard, guard.optimizer, torch.tensor(float("nan")), None, calls.append)
    assert calls == [None] and not torch.equal(model.weight, before)  # a NaN loss is not looked at


@pytest.mark.parametrize("mode", ["sync", "device"])
def test_a_model_without_buffers_skips_too(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard(model, nn.Module(), opt, mode, torch.device("cpu"))
    for bad in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        guard.snapshot_buffers()
        loss = model(torch.ones(3, 4)).sum() * (float("inf") if bad else 1.0)
        loss.backward()
        _guarded_step(guard, guard.optimizer, loss, grad_norm(list(model.parameters())), lambda apply: None)
        opt.zero_grad(set_to_none=True)
        changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
        assert changed == [not bad, not bad]


class _ScaledOptimizer:
    """What Accelerate's optimiser wrapper does under fp16: the GradScaler steps and updates."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler
        self.param_groups, self.state = optimizer.param_groups, optimizer.state

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


@pytest.mark.parametrize("mode", ["sync", "device"])
def test_under_a_grad_scaler_a_skipped_step_keeps_the_scaler_usable(mode: str) -> None:
    """fp16 + clipping: unscale_ runs every step, so the scaler must be stepped and updated every
    step, skipped or not; its own skip leaves the weights alone."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = _ScaledOptimizer(sgd, scaler)
    guard = StepGuard(model, nn.Module(), opt, mode, torch.device("cpu"), scaler_skips=True)
    for bad in (False, True, False, True, True, False):
        before = [p.detach().clone() for p in model.parameters()]
        guard.snapshot_buffers()
        loss = model(torch.ones(3, 4)).pow(2).sum() * (float("nan") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(sgd)  # as accelerator.clip_grad_norm_ does
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        _guarded_step(guard, guard.optimizer, loss, None, lambda apply: None)
        sgd.zero_grad(set_to_none=True)
        assert [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)] == [not bad, not bad]
        assert torch.isfinite(norm) != bad
    assert guard.read_and_reset() == (3, 2)


@pytest.mark.parametrize(
    "objective",
    [
        ["objective.name=moco_v2", "objective.moco_v2.queue_size=8", "objective.moco_v2.bn_splits=1"],
        ["objective.name=dino", "objective.dino.prototypes=8", "objective.dino.warmup_teacher_epochs=1"],
    ],
    ids=["moco_v2", "dino"],
)
def test_a_skipped_step_leaves_the_methods_state_as_if_it_never_ran(objective: list[str]) -> None:
    """The real methods: MoCo v2's update after the step enqueues keys and moves the key encoder,
    DINO's moves the teacher and the centre; a skipped step must leave them as they were."""
    import copy

    from twinview.pretrain.config import load_config
    from twinview.pretrain.models import create_run_model
    from twinview.pretrain.objectives.methods import create_method

    cfg = load_config(
        None,
        [
            "data.path=unused",
            "model.backbone=vit_tiny_patch16_224",
            "model.kwargs.img_size=16",
            "model.kwargs.patch_size=8",
            "model.proj_layers=1",
            "model.proj_dim=8",
            *objective,
        ],
    )
    torch.manual_seed(0)
    model = create_run_model(cfg)
    method = create_method(cfg, model)
    ref_model, ref_method = copy.deepcopy(model), copy.deepcopy(method)
    g = torch.Generator().manual_seed(2)
    batches = [[torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)] for _ in range(6)]
    labels = torch.zeros(2, dtype=torch.long)

    def run(m: nn.Module, meth: nn.Module, guarded: bool) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        guard = StepGuard(m, meth, opt, "device", torch.device("cpu"))
        for i, views in enumerate(batches):
            if not guarded and i in BAD:
                continue
            guard.snapshot_buffers()
            meth.start_step(i, 3)
            loss, keys = meth(m, views, labels)
            loss = loss * (float("nan") if guarded and i in BAD else 1.0)
            loss.backward()
            _guarded_step(
                guard, guard.optimizer, loss, grad_norm(list(m.parameters())), partial(meth.after_step, m, keys, i, 6)
            )
            opt.zero_grad(set_to_none=True)

    run(model, method, guarded=True)
    run(ref_model, ref_method, guarded=False)
    got, want = method.state_dict(), ref_method.state_dict()
    if "queue.ptr" in want:
        good = sum(i not in BAD for i in range(6))  # 4 good steps of 2 keys; all 6 would leave the pointer at 4
        assert int(got["queue.ptr"]) == int(want["queue.ptr"]) == good * 2 % 8
    else:
        assert got["center"].abs().sum() > 0  # the centre moved on the good steps
    for key in want:
        if isinstance(want[key], torch.Tensor):
            assert torch.equal(got[key], want[key]), key
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
