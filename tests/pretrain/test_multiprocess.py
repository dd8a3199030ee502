"""`accelerate launch` with 2 CPU processes (gloo), end to end through the CLI: the run matches a
single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.train import train
from twinview.pretrain.runs import new_run_dir

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

# Per-sample computation only, so one process with a batch of 8 and two with 4 each must agree:
# a ViT (layer norm) and a linear head (no batch norm), and views without random parameters (the
# random views of different processes come from different streams).
SETUP = [
    "model.backbone=vit_tiny_patch16_224",
    "model.kwargs.img_size=24",
    "model.kwargs.patch_size=8",
    "model.proj_layers=1",
    "model.proj_dim=16",
    "data.image_size=24",
    "data.num_workers=0",
    "augment.crop_scale=[1.0,1.0]",
    "augment.crop_ratio=[1.0,1.0]",
    "augment.flip_p=0.0",
    "augment.jitter_p=0.0",
    "augment.grayscale_p=0.0",
    "augment.blur_p=[0.0,0.0]",
    "augment.solarize_p=[0.0,0.0]",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.warmup_epochs=0.5",
    "train.epochs=2",
    "train.log_every=1",
]


def _launch(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "twinview.pretrain.app.cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch on POSIX")
@pytest.mark.parametrize(
    "per_process",
    [["train.batch_size=4"], ["train.batch_size=2", "train.grad_accumulation=2"]],
    ids=["4-per-process", "2x2-cached-accumulation"],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    image_folder: Path, tmp_path: Path, per_process: list[str]
) -> None:
    """NT-Xent over the global batch: negatives gathered from both processes (and, with cached
    accumulation, from every pass), gradients averaged by DDP."""
    common = [f"data.path={image_folder}", f"train.output_dir={tmp_path}", *SETUP]

    two = _launch(["pretrain", *common, *per_process, "train.run_name=two"], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Run directory:") == 2  # printed once at the start, once at the end
    cfg = load_config(None, [*common, "train.batch_size=8", "train.run_name=one"])
    train(cfg, new_run_dir(cfg))

    one_steps, two_steps = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert (
        [s["step"] for s in two_steps] == [s["step"] for s in one_steps] == list(range(1, 7))
    )  # 24 images / 8 x 2 epochs
    for a, b in zip(one_steps, two_steps, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    run = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert run["global_batch"] == 8

    x, y = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-5)
    # the runs trained (the comparison is not between two untouched initialisations)
    init = load_config(None, [*common, "train.batch_size=8"])
    from twinview.pretrain.models import create_model

    torch.manual_seed(init.train.seed)
    start = create_model(init.model).state_dict()
    moved = max((x[k] - start[k]).abs().max().item() for k in x if k in start)
    assert moved > 1e-3
