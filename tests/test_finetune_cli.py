"""`twinview finetune` as a user runs it: every budget with the baseline and the probe, outputs and
the exported classifier in plain timm; an interrupted fine-tune resumed equals an uninterrupted one;
2 processes give the numbers of 1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.conftest import make_image_folder
from twinview.pretrain.app.cli import main

pytestmark = pytest.mark.slow

TINY = [  # timm's test models: a fine-tune is a few seconds on a CPU
    "model.backbone=test_resnet",
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
]
VIT = ["model.backbone=test_vit", "model.kwargs.img_size=24", "model.kwargs.patch_size=8"]
FAST = ["--epochs", "2", "--min-steps", "3", "--precision", "no", "data.num_workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetune-data")
    return make_image_folder(root / "train", per_class=20, seed=0), make_image_folder(
        root / "test", per_class=6, seed=1
    )


def _pretrain(data: tuple[Path, Path], out: Path, extra: tuple[str, ...] = ()) -> Path:
    args = ["pretrain", f"data.path={data[0]}", f"train.output_dir={out}", "train.run_name=run", *TINY, *extra]
    assert main(args) == 0
    return out / "run"


@pytest.fixture(scope="module")
def run_dir(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pretrain(data, tmp_path_factory.mktemp("finetune-run"))


def _predict_plain_timm(export: Path, files: list[str]) -> list[str]:
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        predicted = model((x.float() / 255 - mean) / std).argmax(1)
    return [model.pretrained_cfg["label_names"][p] for p in predicted.tolist()]


def test_every_budget_with_baseline_probe_report_and_export(
    run_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    args = ["finetune", str(run_dir), "--train", str(data[0]), "--test", str(data[1]), "--out", str(out)]
    assert main([*args, "--labels", "1/class,50%,100%", "--batch-size", "8", *FAST]) == 0
    result = json.loads((out / "finetune.json").read_text())
    assert [b["labels"] for b in result["budgets"]] == ["1/class", "50%", "100%"]
    assert [b["images"] for b in result["budgets"]] == [3, 30, 60]
    for b in result["budgets"]:
        for init in ("pretrained", "scratch"):
            assert 0 <= b[init]["top1"] <= b[init]["top5"] <= 1
            assert b[init]["steps"] >= 3  # --min-steps: a subset of 3 images still trains 3 steps
        assert 0 <= b["probe"]["top1"] <= 1
    one = result["budgets"][0]["pretrained"]
    assert (one["epochs"], one["steps"]) == (3, 3)  # 3 images, batch 3: one step per epoch, 3 epochs
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "does pretraining pay?" in report and "| 50% | 30 |" in report
    assert (out / "report.html").is_file()
    # the exported classifier, loaded by plain timm, predicts what twinview finetune reported
    best = max(result["budgets"], key=lambda b: b["pretrained"]["top1"])
    assert result["exported_labels"] == best["labels"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 18
    assert _predict_plain_timm(out / "export", [r["path"] for r in rows]) == [r["predicted"] for r in rows]
    top1 = np.mean([r["predicted"] == r["label"] for r in rows])
    assert top1 == pytest.approx(best["pretrained"]["top1"])
    # finished fine-tunes keep result and weights, not their checkpoints
    assert not (out / "50pct-scratch" / "checkpoints").exists()
    # a second command in the same folder is refused; --resume reuses the finished results
    assert main([*args, "--labels", "100%", *FAST]) == 2
    assert main([*args, "--labels", "100%,1/class,50%", "--batch-size", "8", "--resume", *FAST]) == 0
    assert json.loads((out / "finetune.json").read_text())["budgets"] == result["budgets"]  # sorted by size
    # resuming with another seed (other subsets) is refused, not mixed with the old results
    assert main([*args, "--labels", "50%", "--batch-size", "8", "--resume", "--seed", "1", *FAST]) == 2
    # --overwrite removes only what finetune wrote
    (out / "mine.txt").write_text("keep")
    assert main([*args, "--labels", "1/class", "--batch-size", "8", "--overwrite", "--no-baseline", *FAST]) == 0
    assert (out / "mine.txt").read_text() == "keep" and not (out / "100pct-pretrained").exists()


def test_a_budget_too_small_is_refused_before_training(run_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["finetune", str(run_dir), "--train", str(data[0]), "--test", str(data[1]), "--out", str(tmp_path / "x")]
    assert main([*args, "--labels", "1%", *FAST]) == 2  # 1 % of 20 images per class is none
    assert not (tmp_path / "x").exists()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_interrupted_finetune_resumed_equals_an_uninterrupted_one(
    run_dir: Path, data: tuple[Path, Path], tmp_path: Path, wait_for_log_lines: Any
) -> None:
    common = ["--labels", "100%", "--no-baseline", "--no-probe", "--no-export", "--batch-size", "8"]
    common += ["--epochs", "8", "--min-steps", "0", "--precision", "no", "data.num_workers=0"]
    base = ["finetune", str(run_dir), "--train", str(data[0]), "--test", str(data[1])]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinview.pretrain.app.cli", *base, "--out", str(killed), *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_log_lines(killed / "100pct-pretrained" / "log.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err
    log = [json.loads(line) for line in (killed / "100pct-pretrained" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kind"] == "stopped" and log[-1]["step"] < 8 * 7
    assert not (killed / "100pct-pretrained" / "result.json").exists()
    assert main([*base, "--out", str(killed), "--resume", *common]) == 0
    whole = tmp_path / "whole"
    assert main([*base, "--out", str(whole), *common]) == 0
    a, b = _weights(killed / "100pct-pretrained" / "model.pt"), _weights(whole / "100pct-pretrained" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "finetune.json").read_text())["budgets"][0]["pretrained"] for d in (killed, whole))
    assert (ra["top1"], ra["top5"], ra["steps"]) == (rb["top1"], rb["top5"], rb["steps"])


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "twinview.pretrain.app.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch on POSIX")
def test_two_processes_give_the_numbers_of_one(data: tuple[Path, Path], tmp_path: Path) -> None:
    # per-sample computation only (a ViT: layer norm) and views without random parameters (whole
    # images, no flips), so one process with a batch of 8 and two with 4 each must agree
    vit_run = _pretrain(data, tmp_path / "vit", tuple(VIT))
    common = ["finetune", str(vit_run), "--train", str(data[0]), "--test", str(data[1]), "--labels", "100%"]
    common += ["--no-baseline", "--no-probe", "--no-export", "--crop-scale", "1,1", "--no-flip", *FAST]
    one = _launch([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([*common, "--out", str(tmp_path / "two"), "--batch-size", "4"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (_weights(tmp_path / d / "100pct-pretrained" / "model.pt") for d in ("one", "two"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    ra, rb = (json.loads((tmp_path / d / "finetune.json").read_text())["budgets"][0] for d in ("one", "two"))
    assert ra["pretrained"]["steps"] == rb["pretrained"]["steps"] == 2 * 7
    assert ra["pretrained"]["top1"] == rb["pretrained"]["top1"]
    assert ra["pretrained"]["top5"] == rb["pretrained"]["top5"]


def test_layer_decay_changes_the_pretrained_fine_tune_and_not_the_baseline(
    run_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    from twinview.pretrain.app.finetuning import SETTINGS_FILE

    def finetune(out: Path, *extra: str) -> dict[str, Any]:
        args = ["finetune", str(run_dir), "--train", str(data[0]), "--test", str(data[1]), "--out", str(out)]
        assert main([*args, "--labels", "100%", "--batch-size", "8", "--no-probe", "--no-export", *FAST, *extra]) == 0
        budget: dict[str, Any] = json.loads((out / "finetune.json").read_text())["budgets"][0]
        return budget

    plain, decayed = finetune(tmp_path / "plain"), finetune(tmp_path / "decayed", "--layer-decay", "0.5")

    def recorded(out: Path, init: str) -> Any:
        return json.loads((out / f"100pct-{init}" / SETTINGS_FILE).read_text())["settings"]["layer_decay"]

    assert recorded(tmp_path / "decayed", "pretrained") == 0.5 and recorded(tmp_path / "decayed", "scratch") is None
    keep = ("top1", "top5", "epochs", "steps")
    assert {k: decayed["scratch"][k] for k in keep} == {k: plain["scratch"][k] for k in keep}

    def model(out: Path, init: str) -> dict[str, torch.Tensor]:
        return _weights(out / f"100pct-{init}" / "model.pt")

    a, b = model(tmp_path / "plain", "scratch"), model(tmp_path / "decayed", "scratch")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the baseline is the same fine-tune, bit for bit
    a, b = model(tmp_path / "plain", "pretrained"), model(tmp_path / "decayed", "pretrained")
    stem = next(k for k in a if k.startswith("conv1"))  # the first layer's lr is scaled by 0.5 ** depth
    assert not torch.equal(a[stem], b[stem])
