"""examples/finetune.py on an export, with a few real CIFAR-10 images (skipped where absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


from twinview.pretrain.cli import main

REPO = Path(__file__).resolve().parents[1]


def _finetune_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("finetune", REPO / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_finetune_example_trains_an_export_on_real_cifar10(cifar10_root: Path, image_folder: Path, tmp_path: Path) -> None:
    subset = tmp_path / "cifar"
    for class_dir in sorted((cifar10_root / "train").iterdir())[:3]:  # 3 classes x 30 real images
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:30]:
            (subset / class_dir.name / f.name).symlink_to(f)
    runs = tmp_path / "runs"
    assert main(["pretrain", f"data.path={subset}", f"train.output_dir={runs}", "train.run_name=f", "data.image_size=32",
                 "data.num_workers=0", "train.batch_size=16", "train.epochs=1", "model.proj_hidden_dim=32",
                 "model.proj_dim=16"]) == 0
    assert main(["export", str(runs / "f"), "--out", str(tmp_path / "export")]) == 0
    first = _finetune_module().main(["--weights", str(tmp_path / "export"), "--data", str(subset), "--epochs", "1"])
    result = _finetune_module().main(["--weights", str(tmp_path / "export"), "--data", str(subset), "--epochs", "4"])
    assert result["epoch"] == 4 and 0.0 <= result["val_accuracy"] <= 1.0
    assert result["train_loss"] < first["train_loss"]  # the classifier learns on real images
