"""The examples: finetune.py on an export of a few real CIFAR-10 images (skipped where absent), and the
toy objective dcl_objective.py through the registry."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from twinview.pretrain.app.cli import main

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

REPO = Path(__file__).resolve().parents[1]


def _finetune_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune", REPO / "examples" / "finetune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_trains_an_export_on_real_cifar10(
    cifar10_root: Path, image_folder: Path, tmp_path: Path
) -> None:
    subset = tmp_path / "cifar"
    for class_dir in sorted((cifar10_root / "train").iterdir())[:3]:  # 3 classes x 30 real images
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:30]:
            (subset / class_dir.name / f.name).symlink_to(f)
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "pretrain",
                f"data.path={subset}",
                f"train.output_dir={runs}",
                "train.run_name=f",
                "data.image_size=32",
                "data.num_workers=0",
                "train.batch_size=16",
                "train.epochs=1",
                "model.proj_hidden_dim=32",
                "model.proj_dim=16",
            ]
        )
        == 0
    )
    assert main(["export", str(runs / "f"), "--out", str(tmp_path / "export")]) == 0
    first = _finetune_module().main(["--weights", str(tmp_path / "export"), "--data", str(subset), "--epochs", "1"])
    result = _finetune_module().main(["--weights", str(tmp_path / "export"), "--data", str(subset), "--epochs", "4"])
    assert result["epoch"] == 4 and 0.0 <= result["val_accuracy"] <= 1.0
    assert result["train_loss"] < first["train_loss"]  # the classifier learns on real images


@pytest.fixture
def dcl_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """examples/dcl_objective.py imported as a user's script would, unregistered afterwards."""
    from twinview.pretrain.objectives import registry

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    module = importlib.import_module("dcl_objective")
    yield module
    registry.OBJECTIVES.pop("dcl")
    sys.modules.pop("dcl_objective")


def test_dcl_example_loss_matches_a_brute_force_loop(dcl_module: Any) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z_a, z_b]), dim=1).double()
    n, t, total = 5, 0.3, 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        others = [torch.exp(z[i] @ z[k] / t) for k in range(2 * n) if k not in (i, p)]
        total += -(z[i] @ z[p] / t) + torch.log(sum(others))
    torch.testing.assert_close(dcl_module.dcl(z_a, z_b, t).double(), total / (2 * n), rtol=1e-5, atol=1e-6)


def test_dcl_example_objective_trains_through_the_registry(
    dcl_module: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The toy objective of docs/ARCHITECTURE.md: one registry entry, then config, validation,
    training and export know it."""
    from twinview.pretrain.app.export import export_run
    from twinview.pretrain.config import load_config
    from twinview.pretrain.engine.train import train

    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            "objective.name=dcl",
            "objective.dcl.temperature=0.2",
            "data.image_size=16",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.output_dir={tmp_path}",
            "train.run_name=dcl",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
        ],
    )
    assert cfg.objective.dcl.temperature == 0.2
    train(cfg, tmp_path / "dcl")
    epochs = [json.loads(line) for line in (tmp_path / "dcl" / "metrics.jsonl").read_text().splitlines()]
    epoch = [e for e in epochs if e["kind"] == "epoch"][-1]
    assert epoch["step"] == 2 and epoch["loss"] is not None and epoch["loss"] > 0
    export_run(tmp_path / "dcl", tmp_path / "export")
    assert "arXiv:2110.06848" in (tmp_path / "export" / "config.json").read_text()
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "dcl" in capsys.readouterr().out
