"""Faults: SIGTERM mid-epoch checkpoints and resumes exactly; a corrupt checkpoint falls back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.train import train
from twinview.pretrain.runs import checkpoints, new_run_dir

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

SMALL = [
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.log_every=1",
    "optim.lr=0.1",
    "train.checkpoint_every=100",
]


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(
    image_folder: Path, tmp_path: Path, wait_for_log_lines: Any
) -> None:
    args = [f"data.path={image_folder}", f"train.output_dir={tmp_path}", "train.epochs=12", *SMALL]
    cmd = [sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain", *args, "train.run_name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    wait_for_log_lines(metrics, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM" in err and "twinview pretrain --resume" in err
    saved = checkpoints(tmp_path / "killed")[-1]
    assert "_step_" in saved.name  # a mid-epoch checkpoint, not an epoch end
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain", "--resume", str(tmp_path / "killed")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cfg = load_config(None, [*args, "train.run_name=straight"])
    train(cfg, new_run_dir(cfg))
    _same_weights(tmp_path / "killed" / "model.safetensors", tmp_path / "straight" / "model.safetensors")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"epoch"' in line]
    assert steps[-1] == 12 * 6  # 24 images / 4 per step, 12 epochs: nothing lost, nothing repeated


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            f"train.output_dir={tmp_path}",
            "train.epochs=2",
            "train.run_name=straight",
            *SMALL,
            "train.checkpoint_every=1",
        ],
    )
    straight = new_run_dir(cfg)
    train(cfg, straight)
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    (broken / "model.safetensors").unlink()
    newest = checkpoints(broken)[-1]
    for f in newest.iterdir():
        if f.suffix == ".safetensors":
            f.write_bytes(f.read_bytes()[:100])  # truncated, as by a crash during a copy
    (broken / "checkpoints" / "epoch_0003.partial").mkdir()  # an unfinished save is never a checkpoint
    train(cfg, broken, resume=True)
    assert "cannot be loaded" in capsys.readouterr().out
    _same_weights(broken / "model.safetensors", straight / "model.safetensors")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_9_loses_only_the_work_since_the_last_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    args = [
        f"data.path={image_folder}",
        f"train.output_dir={tmp_path}",
        "train.epochs=12",
        *SMALL,
        "train.checkpoint_every=4",
    ]
    cmd = [sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain", *args, "train.run_name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    metrics = run_dir / "metrics.jsonl"

    def last_step() -> int:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return max([json.loads(line).get("step", 0) for line in lines if line.endswith("}")], default=0)

    deadline = time.time() + 120
    while time.time() < deadline and last_step() < 4 * 6 + 3:  # checkpoint after epoch 4 (step 24), then 3 more steps
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoints(run_dir)
    assert saved and "_step_" not in saved[-1].name
    lost_from = int(saved[-1].name.split("_")[1]) * 6
    assert last_step() > lost_from  # work after the checkpoint existed and is lost

    resumed = subprocess.run(
        [sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {lost_from})" in resumed.stdout  # "Resumed from ... (epoch E, step S)."
    cfg = load_config(None, [*args, "train.run_name=straight"])
    train(cfg, new_run_dir(cfg))
    _same_weights(run_dir / "model.safetensors", tmp_path / "straight" / "model.safetensors")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, 12 * 6 + 1))  # the redone steps are logged once


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_checkpoints(
    image_folder: Path, tmp_path: Path, wait_for_log_lines: Any, sig: signal.Signals
) -> None:
    """Launchers (torchrun, SLURM) and Ctrl-C signal every process of the group, DataLoader workers
    included (SLURM's SIGUSR1 warning too): the workers must not die of it before the loop has
    checkpointed."""
    args = [
        f"data.path={image_folder}",
        f"train.output_dir={tmp_path}",
        "train.epochs=50",
        *SMALL,
        "data.num_workers=2",
        "train.run_name=group",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = tmp_path / "group" / "metrics.jsonl"
    wait_for_log_lines(metrics, 8)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    saved = checkpoints(tmp_path / "group")
    assert saved and "_step_" in saved[-1].name
