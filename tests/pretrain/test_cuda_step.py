"""The GPU paths of the training step: no host sync in a guarded step, and cached accumulation's
dropout replay with the CUDA generator. Skipped without a GPU (bench/gpu_check.py runs them on one)."""

from __future__ import annotations

import copy

import pytest
import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.optim import build_optimizer
from twinview.pretrain.engine.step_guard import StepGuard, grad_norm
from twinview.pretrain.models import create_model
from twinview.pretrain.objectives.methods import create_method

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs it on a GPU)"
    ),
]


def _setup(objective: str, optimizer: str, drop: float = 0.0) -> tuple:
    extra = {"moco_v2": ["objective.moco_v2.queue_size=32", "objective.moco_v2.bn_splits=2"]}.get(objective, [])
    cfg = load_config(
        None,
        [
            "data.path=unused",
            "model.backbone=vit_tiny_patch16_224",
            "model.kwargs.img_size=16",
            "model.kwargs.patch_size=8",
            f"model.kwargs.drop_rate={drop}",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            f"objective.name={objective}",
            f"optim.name={optimizer}",
            *extra,
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model).cuda().train()
    method = create_method(cfg, model).cuda().train()
    return cfg, model, method


@pytest.mark.parametrize(("objective", "optimizer"), [("simclr", "lars"), ("simclr", "adamw"), ("moco_v2", "sgd")])
def test_a_guarded_step_in_device_mode_makes_no_host_sync(objective: str, optimizer: str) -> None:
    cfg, model, method = _setup(objective, optimizer)
    opt = build_optimizer(cfg, model, 0.1, torch.device("cuda"))
    guard = StepGuard(model, method, opt, "device", torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, device="cuda", generator=g) for _ in range(2)]
    labels = torch.zeros(8, dtype=torch.long, device="cuda")
    params = list(model.parameters())

    def step(bad: bool) -> None:
        guard.snapshot_buffers()
        loss, keys = method(model, views, labels)
        loss = loss * (float("nan") if bad else 1.0)
        loss.backward()
        decided = guard.decide(loss, grad_norm(params))  # as train_step does
        if decided.step_optimizer:
            opt.step()
        guard.restore_weights(decided)
        if decided.update_method:
            method.after_step(model, keys, 0, 10, decided.apply)
        guard.restore_buffers(decided)
        opt.zero_grad(set_to_none=True)

    step(False)  # the first step reads the flag once (the optimiser state is created by it)
    assert guard.mode == "device"
    before = [p.detach().clone() for p in params]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))  # the bad step was undone on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert guard.read_and_reset() == (1, 1)


def test_cached_accumulation_replays_cuda_dropout() -> None:
    from accelerate import Accelerator

    from twinview.pretrain.engine.accumulation import cached_passes

    _, model, method = _setup("simclr", "sgd", drop=0.3)
    passes = [
        ([torch.randn(4, 3, 16, 16, device="cuda") for _ in range(2)], torch.zeros(4, dtype=torch.long, device="cuda"))
        for _ in range(2)
    ]
    ref_model, ref_method = copy.deepcopy(model), copy.deepcopy(method)
    torch.cuda.manual_seed(5)
    outs = [ref_method.embed(ref_model, views) for views, _ in passes]
    ref = ref_method.loss([torch.cat(p) for p in zip(*outs, strict=True)], [], torch.cat([lab for _, lab in passes]))
    ref.backward()
    torch.cuda.manual_seed(5)
    loss, _ = cached_passes(Accelerator(), model, method, passes)
    torch.testing.assert_close(loss, ref.detach())
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
