"""Non-finite steps in real training runs: skipped and counted, identical in both modes, and a stop
with the last checkpoint intact after too many in a row."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.app.cli import main
from twinview.pretrain.config import load_config
from twinview.pretrain.engine.train import train
from twinview.pretrain.objectives import methods
from twinview.pretrain.runs import checkpoints, new_run_dir

SMALL = [
    "model.backbone=resnet18",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.log_every=1",
    "optim.lr=0.1",
]


def _nan_on_calls(fn: Callable[..., torch.Tensor], bad: Callable[[int], bool]) -> Callable[..., torch.Tensor]:
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = fn(*args, **kwargs)
        return loss * float("nan") if bad(calls[0]) else loss

    return wrapped


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simclr", "moco_v2"])
def test_nan_steps_are_skipped_counted_and_identical_with_or_without_host_sync(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str
) -> None:
    extra = {"simclr": [], "moco_v2": ["objective.moco_v2.queue_size=16", "objective.moco_v2.bn_splits=2"]}[objective]
    weights = {}
    for mode in ("sync", "device"):
        loss_name = "nt_xent" if objective == "simclr" else "info_nce"
        monkeypatch.setattr(methods, loss_name, _nan_on_calls(getattr(methods, loss_name), lambda n: n in (3, 4)))
        cfg = load_config(
            None,
            [
                f"data.path={image_folder}",
                f"train.output_dir={tmp_path}",
                *SMALL,
                *extra,
                f"objective.name={objective}",
                "train.epochs=2",
                f"train.run_name={mode}",
                f"train.nonfinite_check={mode}",
            ],
        )
        run_dir = new_run_dir(cfg)
        train(cfg, run_dir)
        monkeypatch.undo()
        steps, epochs = _records(run_dir, "step"), _records(run_dir, "epoch")
        assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 2, 2, 2]  # steps 3 and 4 of 6
        assert [r["loss"] is None for r in steps] == [False, False, True, True, False, False]
        assert all(r["grad_norm"] > 0 for r in steps if r["loss"] is not None)
        assert [e["skipped_steps"] for e in epochs] == [1, 1]
        assert all(e["loss"] > 0 for e in epochs)
        weights[mode] = load_file(run_dir / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights[mode].values())
    for key in weights["sync"]:
        assert torch.equal(weights["sync"][key], weights["device"][key]), key


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_with_the_last_checkpoint_intact(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(methods, "nt_xent", _nan_on_calls(methods.nt_xent, lambda n: n >= 4))  # from epoch 2 on
    args = [
        f"data.path={image_folder}",
        f"train.output_dir={tmp_path}",
        *SMALL,
        "train.epochs=3",
        "train.run_name=diverged",
        "train.max_nonfinite_steps=2",
    ]
    assert main(["pretrain", *args]) == 3
    err = capsys.readouterr().err
    run_dir = tmp_path / "diverged"
    assert "2 optimiser steps in a row had a non-finite loss" in err and f"--resume {run_dir}" in err
    assert "epoch_0001" in err and "is intact" in err
    assert [c.name for c in checkpoints(run_dir)] == ["epoch_0001"]  # nothing written from the bad steps
    assert _records(run_dir, "stopped")[0]["step"] == 5
    assert not (run_dir / "model.safetensors").exists()

    monkeypatch.undo()  # the cause fixed: the run continues from the intact checkpoint
    assert main(["pretrain", "--resume", str(run_dir)]) == 0
    assert all(torch.isfinite(w).all() for w in load_file(run_dir / "model.safetensors").values())
    assert _records(run_dir, "epoch")[-1]["step"] == 9


def test_the_check_can_be_turned_off(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "nt_xent", _nan_on_calls(methods.nt_xent, lambda n: n == 2))
    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            f"train.output_dir={tmp_path}",
            *SMALL,
            "train.epochs=1",
            "train.max_nonfinite_steps=0",
        ],
    )
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(cfg, new_run_dir(cfg))


@pytest.mark.slow
def test_a_run_resumes_whether_or_not_the_check_was_on_when_it_was_saved(image_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            f"train.output_dir={tmp_path}",
            *SMALL,
            "train.epochs=1",
            "train.max_nonfinite_steps=0",
            "train.run_name=off",
        ],
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    assert main(["pretrain", "--resume", str(run_dir), "train.epochs=2", "train.max_nonfinite_steps=10"]) == 0
    assert main(["pretrain", "--resume", str(run_dir), "train.epochs=3", "train.max_nonfinite_steps=0"]) == 0
    assert _records(run_dir, "epoch")[-1]["step"] == 9
