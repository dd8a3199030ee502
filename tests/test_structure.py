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
FOLDERS = {"pretrain": "twinview.pretrain", "augment": "twinview.augment", "evaluate": "twinview.evaluate"}
APP = "twinview.pretrain.app"  # the application layer: the command and what it orchestrates
# package -> the twinview packages it must not import (the data flow: augment and evaluate are
# libraries of their own; pretrain composes them; only the app layer imports the app layer)
FORBIDDEN = {"augment": ("twinview.pretrain", "twinview.evaluate"), "evaluate": ("twinview.pretrain",)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join((FOLDERS[parts[0]], *parts[1:]))
    return name.removesuffix(".__init__")


def _imports(path: Path, typing_only: bool = True) -> list[str]:
    """The twinview modules a file imports (``from package import module`` names the module);
    without ``typing_only``, imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                skipped |= {id(n) for n in ast.walk(node)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _library_files() -> list[Path]:
    return [
        f for folder in FOLDERS for f in sorted((REPO / folder).rglob("*.py")) if not _module_name(f).startswith(APP)
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream_of_the_data_flow(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    wrong = [
        f"{f.relative_to(REPO)}: {name}" for f in files for name in _imports(f) if name.startswith(FORBIDDEN[package])
    ]
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_no_library_module_imports_the_application_layer() -> None:
    files = _library_files()
    assert len(files) > 40 and all(_module_name(f).startswith("twinview.") for f in files)
    wrong = [f"{f.relative_to(REPO)}: {name}" for f in files for name in _imports(f) if name.startswith(APP)]
    assert not wrong, "library modules importing the app layer (cli, commands, evaluation, export, demo):\n" + (
        "\n".join(wrong)
    )


def _import_graph() -> dict[str, set[str]]:
    """Module -> the twinview modules it imports when it runs (TYPE_CHECKING imports left out)."""
    files = {_module_name(f): f for folder in FOLDERS for f in (REPO / folder).rglob("*.py")}
    return {
        module: {name for name in _imports(path, typing_only=False) if name in files and name != module}
        for module, path in files.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph (module names, first = last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_no_module_imports_itself_through_others() -> None:
    graph = _import_graph()
    assert "twinview.pretrain.engine.train" in graph and "twinview.pretrain.app.cli" in graph
    assert not _cycle(graph), " -> ".join(_cycle(graph))


def test_the_structure_checks_see_a_forbidden_import_and_a_cycle(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom twinview.pretrain.config import Config\nfrom twinview.pretrain.app import cli\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from twinview.evaluate import run\n"
    )
    found = _imports(bad)
    assert {"twinview.pretrain.config.Config", "twinview.pretrain.app.cli", "twinview.evaluate.run"} <= set(found)
    assert [n for n in found if n.startswith(APP)] == ["twinview.pretrain.app", "twinview.pretrain.app.cli"]
    assert "twinview.evaluate.run" in _imports(bad) and "twinview.evaluate.run" not in _imports(bad, False)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []


def _fresh(code: str) -> list[str]:
    """Runs ``code`` in a fresh interpreter; returns every module it loaded (a failed import fails)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = {"torch", "kornia", "matplotlib", "timm", "accelerate", "datasets", "sklearn"}


def _top_level(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_reading_and_validating_a_config_loads_no_torch_kornia_or_matplotlib() -> None:
    loaded = _fresh(
        "from twinview.pretrain.config import load_config\n"
        "from twinview.pretrain.validate import World, validate\n"
        "validate(load_config('simclr-cifar10', ['data.path=x']), World())"
    )
    assert "twinview.pretrain.config" in loaded
    assert not HEAVY & _top_level(loaded)


def test_the_command_line_parses_without_loading_torch() -> None:
    """``twinview --help`` and argument errors answer at once: each command's module is imported
    only when it runs."""
    loaded = _fresh("from twinview.pretrain.app.cli import build_parser\nbuild_parser().format_help()")
    assert "twinview.pretrain.app.cli" in loaded
    assert not HEAVY & _top_level(loaded)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module",
    [
        "twinview.augment.views",
        "twinview.evaluate.run",
        "twinview.pretrain.engine.train",
        "twinview.pretrain.app.evaluation",
        "twinview.pretrain.app.embedding",
    ],
)
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    assert module in _fresh(f"import {module}")  # a failed (e.g. circular) import fails _fresh


@pytest.mark.slow
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
