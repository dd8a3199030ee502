"""Gradient accumulation, and exact mid-epoch resume with it and with MoCo's queue."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.signals import TrainingInterrupted
from twinview.pretrain.engine.train import train
from twinview.pretrain.objectives import methods, registry
from twinview.pretrain.runs import checkpoints, new_run_dir

# No batch-dependent computation (ViT: layer norm; linear head) and views without random parameters
PER_SAMPLE = [
    "model.backbone=vit_tiny_patch16_224",
    "model.kwargs.img_size=24",
    "model.kwargs.patch_size=8",
    "model.proj_layers=1",
    "model.proj_dim=16",
    "augment.crop_scale=[1.0,1.0]",
    "augment.crop_ratio=[1.0,1.0]",
    "augment.flip_p=0.0",
    "augment.jitter_p=0.0",
    "augment.grayscale_p=0.0",
    "augment.blur_p=[0.0,0.0]",
    "augment.solarize_p=[0.0,0.0]",
    "optim.name=sgd",
]
COMMON = [
    "data.image_size=24",
    "data.num_workers=0",
    "train.log_every=1",
    "optim.lr=0.05",
    "optim.warmup_epochs=0.5",
    "train.epochs=2",
]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _per_sample_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """A loss that is a mean of independent per-image terms, so micro-batches must add up to the batch."""
    return ((z_a - 1.0) ** 2 + (z_b + 0.5) ** 2).sum(dim=1).mean()


@pytest.mark.slow
def test_two_accumulated_passes_of_4_equal_one_step_of_8_for_a_per_image_loss(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(methods, "nt_xent", _per_sample_loss)
    runs = {}
    lr = "optim.lr=0.002"
    for name, batch, k in [("big", 8, 1), ("accumulated", 4, 2)]:
        cfg = load_config(
            None,
            [
                f"data.path={image_folder}",
                f"train.output_dir={tmp_path}",
                *COMMON,
                *PER_SAMPLE,
                f"train.batch_size={batch}",
                f"train.grad_accumulation={k}",
                f"train.run_name={name}",
                lr,
            ],
        )
        runs[name] = new_run_dir(cfg)
        train(cfg, runs[name])
    big, acc = _records(runs["big"], "step"), _records(runs["accumulated"], "step")
    assert [r["step"] for r in acc] == [r["step"] for r in big] == list(range(1, 7))  # 24 images / 8, 2 epochs
    for a, b in zip(big, acc, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == a["lr"]
    assert _records(runs["accumulated"], "run")[0]["global_batch"] == 8
    x, y = load_file(runs["big"] / "model.safetensors"), load_file(runs["accumulated"] / "model.safetensors")
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-6)


def _signal_on_call(fn: Callable[..., torch.Tensor], call: int) -> Callable[..., torch.Tensor]:
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, in the middle of a step
        return fn(*args, **kwargs)

    return wrapped


MOCO = ["objective.name=moco_v2", "objective.moco_v2.queue_size=16", "objective.moco_v2.bn_splits=2"]
# extra settings, the loss function that sends SIGTERM, on which call, and the step then checkpointed
# (24 images / 4 per pass: 6 passes per epoch; a cached step calls its loss once, an independent pass once each)
RESUMED = {
    "moco_v2": ([*MOCO], "info_nce", 9, 9),
    "moco_v2-cached": ([*MOCO, "train.grad_accumulation=2"], "info_nce", 5, 5),
    "simclr-cached": (["train.grad_accumulation=2"], "nt_xent", 5, 5),
    "simclr-independent": (["train.grad_accumulation=2", "train.grad_accumulation_mode=independent"], "nt_xent", 9, 5),
}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("name", list(RESUMED))
def test_a_mid_epoch_interrupt_resumes_bitwise(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    extra, loss_name, call, step = RESUMED[name]
    args = [
        f"data.path={image_folder}",
        f"train.output_dir={tmp_path}",
        *COMMON,
        "model.backbone=resnet18",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "train.batch_size=4",
        "train.epochs=3",
        *extra,
    ]
    straight_cfg = load_config(None, [*args, "train.run_name=straight"])
    train(straight_cfg, new_run_dir(straight_cfg))

    cfg = load_config(None, [*args, "train.run_name=interrupted"])
    run_dir = new_run_dir(cfg)
    monkeypatch.setattr(methods, loss_name, _signal_on_call(getattr(methods, loss_name), call))  # epoch 2, mid-step
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        train(cfg, run_dir)
    monkeypatch.undo()
    saved = checkpoints(run_dir)[-1]
    assert "_step_" in saved.name
    assert int(saved.name.split("_step_")[1]) == step  # the step during which the signal came, completed

    train(cfg, run_dir, resume=True)
    x, y = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    for key in x:
        assert torch.equal(x[key], y[key]), key
    assert _records(run_dir, "epoch")[-1]["step"] == _records(tmp_path / "straight", "epoch")[-1]["step"]
    if name.startswith("moco"):  # the queue and key encoder came back exactly too
        a = torch.load(_method_state(tmp_path / "straight"), weights_only=False)
        b = torch.load(_method_state(run_dir), weights_only=False)
        assert torch.equal(a["queue.keys"], b["queue.keys"])
        assert all(torch.equal(a[key], b[key]) for key in a if key.startswith("key."))


def _method_state(run_dir: Path) -> Path:
    """The method's (MoCo) state file in the newest checkpoint: the largest custom_checkpoint."""
    files = sorted(checkpoints(run_dir)[-1].glob("custom_checkpoint_*.pkl"), key=lambda p: p.stat().st_size)
    return files[-1]


def _objective_setup(objective: str) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    from twinview.pretrain.models import create_run_model
    from twinview.pretrain.objectives.methods import create_method

    extra = {
        "moco_v2": ["objective.moco_v2.queue_size=32", "objective.moco_v2.bn_splits=2"],
        "triplet": ["objective.triplet.mining=semi_hard"],
    }
    cfg = load_config(
        None,
        [
            "data.path=unused",
            "model.backbone=vit_tiny_patch16_224",
            "model.kwargs.img_size=16",
            "model.kwargs.patch_size=8",
            "model.kwargs.drop_rate=0.2",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            "model.predictor_hidden_dim=16",
            f"objective.name={objective}",
            *extra.get(objective, []),
        ],
    )
    torch.manual_seed(0)
    model = create_run_model(cfg)  # dropout in the ViT, batch norm in the head
    method = create_method(cfg, model)
    return cfg, model.train(), method.train()


@pytest.mark.parametrize("objective", list(registry.objectives()))  # every shipped objective
def test_cached_accumulation_gives_the_gradient_of_one_loss_over_all_passes(objective: str) -> None:
    """Reference: every pass forwarded with gradient kept (the memory cached mode saves), one loss
    over all of them. Same dropout masks, batch norm per pass, statistics updated once per pass."""
    import copy

    from accelerate import Accelerator

    from twinview.pretrain.engine.accumulation import cached_passes

    _, model, method = _objective_setup(objective)
    g = torch.Generator().manual_seed(3)
    passes = [
        ([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)], torch.tensor([0, 0, 1, 1]) + 2 * i)
        for i in range(3)
    ]
    ref_model, ref_method = copy.deepcopy(model), copy.deepcopy(method)

    torch.manual_seed(7)
    outs, keys = [], []
    for views, _ in passes:
        outs.append(ref_method.embed(ref_model, views))
        keys.append(ref_method.keys(views))
    ref_keys = [torch.cat(p) for p in zip(*keys, strict=True)]
    outputs = [torch.cat(p) for p in zip(*outs, strict=True)]
    ref_loss = ref_method.loss(outputs, ref_keys, torch.cat([lab for _, lab in passes]))
    ref_loss.backward()
    ref_rng = torch.get_rng_state()

    torch.manual_seed(7)
    loss, step_keys = cached_passes(Accelerator(cpu=True), model, method, passes)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the run's random stream continues as without caching
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref_model.named_buffers(), strict=True):
        torch.testing.assert_close(b, c[1], rtol=1e-6, atol=1e-7, msg=name)  # updated once per pass, not twice
    assert len(step_keys) == len(ref_keys)  # every pass's keys, in order, for the MoCo queue after the step
    for k, ref_k in zip(step_keys, ref_keys, strict=True):
        torch.testing.assert_close(k, ref_k)
    for (name, b), c in zip(method.state_dict().items(), ref_method.state_dict().values(), strict=True):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(b, c, msg=name)  # the loss changed no state of the method


def test_independent_accumulation_steps_on_the_average_of_per_pass_gradients() -> None:
    """Reference: each pass's own loss, gradients averaged over the passes, one SGD step. The
    training step's own loop runs it (one pass is its special case)."""
    import copy
    from types import SimpleNamespace

    from accelerate import Accelerator

    from twinview.pretrain.engine.step_guard import StepGuard
    from twinview.pretrain.engine.train import train_step

    _, model, method = _objective_setup("simclr")
    g = torch.Generator().manual_seed(3)
    passes = [
        ([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)], torch.zeros(4, dtype=torch.long)) for _ in range(2)
    ]
    ref_model, ref_method = copy.deepcopy(model), copy.deepcopy(method)
    torch.manual_seed(7)
    losses = [ref_method(ref_model, views, labels)[0] for views, labels in passes]
    (sum(losses) / 2).backward()
    torch.optim.SGD(ref_model.parameters(), lr=0.5).step()

    torch.manual_seed(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(optim=SimpleNamespace(clip_grad_norm=0.0)),
        accelerator=Accelerator(cpu=True),
        model=model,
        online=model,
        method=method,
        optimizer=optimizer,
        scheduler=SimpleNamespace(step_update=lambda num_updates: None),
        guard=StepGuard(model, method, optimizer, "off", torch.device("cpu")),
        progress=SimpleNamespace(step=0),
        steps_per_epoch=1,
        total_steps=1,
        parameters=list(model.parameters()),
        passes=len(passes),
        cached=False,
    )
    loss, ok, _ = train_step(trainer, iter(passes))  # type: ignore[arg-type]
    torch.testing.assert_close(loss, (sum(losses) / 2).detach())
    assert bool(ok) and trainer.progress.step == 1
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
