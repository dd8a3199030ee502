"""The package structure: which package may import which, light config reading, and every
shipped recipe through validation and one real optimiser step."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image_folder
from twinview.pretrain.config import load_config, shipped_recipes
from twinview.pretrain.engine.train import current_world
from twinview.pretrain.validate import validate

REPO = Path(__file__).resolve().parents[1]
# package -> the twinview packages it must not import (the data flow: augment and evaluate are
# libraries of their own; pretrain composes them)
FORBIDDEN = {"augment": ("twinview.pretrain", "twinview.evaluate"), "evaluate": ("twinview.pretrain",)}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream_of_the_data_flow(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    wrong = [
        f"{f.relative_to(REPO)}: {name}" for f in files for name in _imports(f) if name.startswith(FORBIDDEN[package])
    ]
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_the_dag_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom twinview.pretrain.config import Config\n")
    assert [n for n in _imports(bad) if n.startswith(FORBIDDEN["augment"])] == ["twinview.pretrain.config"]


def _fresh(code: str) -> list[str]:
    """Runs ``code`` in a fresh interpreter; returns the top-level modules it loaded."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reading_and_validating_a_config_loads_no_torch_kornia_or_matplotlib() -> None:
    loaded = _fresh(
        "from twinview.pretrain.config import load_config\n"
        "from twinview.pretrain.validate import World, validate\n"
        "validate(load_config('simclr-cifar10', ['data.path=x']), World())"
    )
    assert "twinview" in loaded
    assert not {"torch", "kornia", "matplotlib", "timm", "accelerate"} & set(loaded)


@pytest.mark.parametrize(
    "module",
    [
        "twinview.augment.views",
        "twinview.evaluate.run",
        "twinview.pretrain.engine.train",
        "twinview.pretrain.cli",
    ],
)
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    assert "twinview" in _fresh(f"import {module}")


@pytest.mark.parametrize("recipe", shipped_recipes())
def test_every_shipped_recipe_validates_and_takes_one_optimiser_step(recipe: str, tmp_path: Path) -> None:
    """The recipe's own backbone, objective, optimiser, schedule and views, shrunk to tiny images,
    a small batch and a narrow head."""
    from twinview.pretrain.engine.train import train

    data = make_image_folder(tmp_path / "img", classes=4, per_class=8, size=32)
    vit = "vit" in load_config(recipe, ["data.path=/imgs"]).model.backbone
    overrides = [
        f"data.path={data}",
        "data.image_size=32",
        *(["model.kwargs.img_size=32"] if vit else []),
        "data.num_workers=0",
        "train.batch_size=16",
        "data.samples_per_class=4",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        f"train.output_dir={tmp_path}",
        "train.run_name=r",
        "data.cache=none",
        "train.mixed_precision=no",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "model.predictor_hidden_dim=32",
        "objective.moco_v2.queue_size=64",
        "objective.moco_v2.bn_splits=2",
        "augment.crop_size=0",
    ]
    cfg = load_config(recipe, overrides)
    validate(cfg, current_world(cfg))
    weights = train(cfg, tmp_path / "r")
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epoch = [m for m in metrics if m["kind"] == "epoch"][-1]
    assert weights.is_file() and epoch["step"] == 1 and epoch.get("skipped_steps", 0) == 0
    assert epoch["loss"] is not None and epoch["loss"] > 0
