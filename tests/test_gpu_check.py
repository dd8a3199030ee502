"""bench/gpu_check.py --dry-run: every part of the prepared GPU check, at toy sizes on the CPU, so the
script that runs on a GPU is known to work before one is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_part_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["cuda_tests", "views", "train", "data", "run"] and all(p["ok"] for p in parts.values())
    tests = parts["cuda_tests"]["tests"]
    assert len(tests) >= 5 and set(tests.values()) == {"skipped"}  # collected by the cuda marker; no GPU here
    for row in parts["views"]["recipes"].values():
        assert row["fast_images_per_s"] > 0 and row["kornia_images_per_s"] > 0
    assert 0 < parts["views"]["resnet50_step"]["views_share"] < 1
    train = parts["train"]
    assert (
        train["resnet18_cifar_32px_compiled"]["first_step_s"] > train["resnet18_cifar_32px_compiled"]["step_ms"] / 1000
    )
    assert train["compile_speedup"] > 0
    assert parts["data"]["epochs"]["1"]["images"] == 32  # 36 images in batches of 8, last one dropped
    assert parts["data"]["decode"]["cpu_images_per_s"] > 0 and parts["data"]["decode"]["gpu_images_per_s"] > 0
    run = parts["run"]
    assert run["epochs"] >= 1 and 0 <= run["knn_top1"] <= 1
    assert run["projected_200_epochs_min"] == 200 * run["seconds_per_epoch_median"] / 60
