"""Every objective through the `twinview` command as a user runs it: two optimiser steps, --resume,
evaluate, export (loaded in plain timm); and an objective from outside twinview (examples/
dcl_objective.py as a plugin) through the same commands, each in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from twinview.pretrain.app.cli import main
from twinview.pretrain.runs import load_trained_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.log_every=1",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "model.predictor_hidden_dim=16",
]
EXTRA = {"dino": ["objective.dino.prototypes=64", "augment.local_crops=2", "objective.dino.warmup_teacher_epochs=1"]}
NEW = ("byol", "simsiam", "barlow_twins", "vicreg", "dino")


def _steps(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["loss"]) for r in records if r["kind"] == "epoch"]


def _assert_export_is_the_runs_backbone(run_dir: Path, export_dir: Path) -> None:
    _, trained = load_trained_model(run_dir)
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.backbone(x))


@pytest.mark.parametrize("objective", NEW)
def test_objective_trains_resumes_evaluates_and_exports(objective: str, image_folder: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    common = [f"data.path={image_folder}", f"train.output_dir={runs}", "train.run_name=r", *TINY]
    assert main(["pretrain", f"objective.name={objective}", *common, *EXTRA.get(objective, [])]) == 0
    run_dir = runs / "r"
    first = _steps(run_dir)
    assert len(first) == 1 and first[0][1] is not None and torch.isfinite(torch.tensor(first[0][1]))
    assert main(["pretrain", "--resume", str(run_dir), "train.epochs=2"]) == 0
    assert [e for e, _ in _steps(run_dir)] == [1, 2]
    assert main(["evaluate", str(run_dir), "--train", str(image_folder), "--test", str(image_folder)]) == 0
    assert 0.0 <= json.loads((run_dir / "eval.json").read_text())["pretrained"]["knn_top1"] <= 1.0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    card = json.loads((tmp_path / "export" / "config.json").read_text())
    assert objective in json.dumps(card)
    _assert_export_is_the_runs_backbone(run_dir, tmp_path / "export")


def _cli(args: list[str], pythonpath: Path | None = None) -> None:
    """``twinview ARGS`` in a fresh process (nothing registered in this one counts)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath or ""), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "twinview.pretrain.app.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _installed_plugin(root: Path) -> Path:
    """examples/dcl_objective.py installed as a package would be: the module on the path and a
    dist-info with an entry point in the ``twinview.objectives`` group."""
    root.mkdir()
    shutil.copy(REPO / "examples" / "dcl_objective.py", root / "dcl_objective.py")
    info = root / "dcl_objective-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dcl-objective\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[twinview.objectives]\ndcl = dcl_objective\n")
    return root


def test_an_installed_plugin_objective_runs_every_command_in_fresh_processes(
    image_folder: Path, tmp_path: Path
) -> None:
    site = _installed_plugin(tmp_path / "site")
    runs = tmp_path / "runs"
    common = [f"data.path={image_folder}", f"train.output_dir={runs}", "train.run_name=dcl", *TINY]
    _cli(["pretrain", "objective.name=dcl", "objective.dcl.temperature=0.2", *common], site)
    run_dir = runs / "dcl"
    assert "temperature: 0.2" in (run_dir / "config.yaml").read_text()
    _cli(["pretrain", "--resume", str(run_dir), "train.epochs=2"], site)
    assert [e for e, _ in _steps(run_dir)] == [1, 2]
    _cli(["evaluate", str(run_dir), "--train", str(image_folder), "--test", str(image_folder)], site)
    assert json.loads((run_dir / "eval.json").read_text())["pretrained"]["knn_top1"] >= 0.0
    _cli(["embed", str(run_dir), "--data", str(image_folder), "--out", str(tmp_path / "e.npy")], site)
    assert (tmp_path / "e.npy").is_file()
    _cli(["export", str(run_dir), "--out", str(tmp_path / "export")], site)
    assert "arXiv:2110.06848" in (tmp_path / "export" / "config.json").read_text()
    sys.path.insert(0, str(site))  # this process loads the run as the fresh ones did
    try:
        __import__("dcl_objective")  # this process read the entry points before the plugin was there
        _assert_export_is_the_runs_backbone(run_dir, tmp_path / "export")
    finally:
        sys.path.remove(str(site))
        from twinview.pretrain.objectives import registry

        registry.OBJECTIVES.pop("dcl", None)
        sys.modules.pop("dcl_objective", None)


def test_a_plugin_file_is_recorded_with_the_run_and_loaded_by_later_commands(
    image_folder: Path, tmp_path: Path
) -> None:
    plugin = tmp_path / "mine" / "dcl_objective.py"
    plugin.parent.mkdir()
    shutil.copy(REPO / "examples" / "dcl_objective.py", plugin)
    runs = tmp_path / "runs"
    common = [f"data.path={image_folder}", f"train.output_dir={runs}", "train.run_name=p", *TINY]
    _cli(["pretrain", "--plugin", str(plugin), "objective.name=dcl", *common])
    run_dir = runs / "p"
    assert str(plugin) in (run_dir / "config.yaml").read_text()
    _cli(["pretrain", "--resume", str(run_dir), "train.epochs=2"])  # no --plugin: config.yaml has it
    _cli(["evaluate", str(run_dir), "--train", str(image_folder), "--test", str(image_folder)])
    _cli(["export", str(run_dir), "--out", str(tmp_path / "export")])
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_an_unknown_plugin_is_refused_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--plugin", "no_such_module_here", "data.path=x"]) != 0
    assert "objective.plugins" in capsys.readouterr().err
