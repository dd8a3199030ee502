"""The `twinview` command as a user runs it: pretrain -> evaluate -> export, and its errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from twinview.pretrain.app.cli import main

TINY = [
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
]


@pytest.mark.slow
def test_pretrain_evaluate_export(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    code = main(
        [
            "pretrain",
            "--config",
            "simclr-cifar10",
            f"data.path={image_folder}",
            f"train.output_dir={runs}",
            "train.run_name=cli",
            *TINY,
        ]
    )
    assert code == 0
    run_dir = runs / "cli"
    assert (run_dir / "model.safetensors").is_file()

    code = main(
        [
            "evaluate",
            str(run_dir),
            "--train",
            str(image_folder),
            "--test",
            str(image_folder),
            "--baseline",
            "--linear-probe",
            "eval.knn_k=5",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "pretrained backbone" in out and "random-init backbone" in out
    result = json.loads((run_dir / "eval.json").read_text())
    # Test set == train set, k=5 of 8 per class: each image finds itself first, so top-1 is high.
    assert result["pretrained"]["knn_top1"] >= 0.9 and result["pretrained"]["k"] == 5
    assert 0.0 <= result["random_init"]["knn_top1"] <= 1.0
    pretrained = result["pretrained"]
    assert pretrained["backbone_unchanged"] and 0.0 <= pretrained["linear_probe"]["probe_top1"] <= 1.0
    assert set(pretrained["retrieval"]) == {"recall@1", "recall@5", "recall@10", "precision@1", "map@r"}
    assert 0.0 <= pretrained["verification"]["roc_auc"] <= 1.0 and pretrained["diagnostics"]["dims"] == 512
    assert 0.0 <= pretrained["diagnostics"]["alignment"] <= 4.0  # squared distance of unit vectors
    # the same folder as both splits: every test image is a training image, and the user is told
    leaks = pretrained["leaks"]
    assert leaks["test_images"] == leaks["leaked"] == leaks["exact"] == 24 and leaks["knn_top1_without"] is None
    assert "warning: 24 of 24 test images (100.0%) are near-duplicates of training images" in out
    with (run_dir / "leaks.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["test_image"] == r["train_image"] and r["exact"] == "true" for r in rows)
    assert "random_init" in result and "leaks" not in result["random_init"]  # a property of the data: checked once
    report = (run_dir / "report.md").read_text()
    assert "## pretrained" in report and "## random_init" in report and "linear probe top-1" in report
    assert "## Leaks between train and test" in report
    from PIL import Image

    for name in ("training.png", "embeddings.png", "neighbours.png"):
        png = Image.open(run_dir / "plots" / name).convert("L")
        assert png.size[0] > 300 and png.size[1] > 200
        assert len(np.unique(np.asarray(png))) > 20, name  # a drawn figure, not a blank canvas

    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    export_dir = tmp_path / "export"
    assert (
        main(["evaluate", str(export_dir), "--train", str(image_folder), "--test", str(image_folder), "eval.knn_k=5"])
        == 0
    )
    from_export = json.loads((export_dir / "eval.json").read_text())["pretrained"]
    assert from_export["knn_top1"] == pytest.approx(result["pretrained"]["knn_top1"])  # same backbone, same numbers
    card = (tmp_path / "export" / "README.md").read_text()
    assert "resnet18" in card and "simclr" in card
    assert f"| pretrained | kNN top-1 / top-5 (k=5) | {result['pretrained']['knn_top1']:.4f}" in card
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 512)


@pytest.mark.slow
def test_resume_extends_a_finished_run(image_folder: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "pretrain",
                "--config",
                "demo",
                f"data.path={image_folder}",
                f"train.output_dir={runs}",
                "train.run_name=r",
                *TINY,
            ]
        )
        == 0
    )
    assert main(["pretrain", "--resume", str(runs / "r"), "train.epochs=2"]) == 0
    epochs = [
        json.loads(line)["epoch"]
        for line in (runs / "r" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]
    assert epochs == [1, 2]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["pretrain", "--config", "demo", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["pretrain", "--config", "demo", "data.path=/does/not/exist", "train.output_dir={tmp}"], "does not exist"),
        (["pretrain", "--config", "simclr-cifar10"], "data.path is not set"),
        (
            ["evaluate", "{tmp}", "--train", "x", "--test", "y"],
            "neither a twinview run directory (config.yaml) nor an export",
        ),
        (["export", "{tmp}/nothing", "--out", "{tmp}/e"], "not a twinview run directory"),
    ],
)
def test_errors_are_one_clear_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_is_installed() -> None:
    bindir = Path(sys.executable).parent
    result = subprocess.run([str(bindir / "twinview"), "--help"], capture_output=True, text=True, check=True)
    for command in ("pretrain", "evaluate", "export", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_onnx_export_gives_the_same_features(image_folder: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra; install it to check ONNX")
    runs = tmp_path / "runs"
    assert main(["pretrain", f"data.path={image_folder}", f"train.output_dir={runs}", "train.run_name=o", *TINY]) == 0
    assert main(["export", str(runs / "o"), "--out", str(tmp_path / "export"), "--onnx"]) == 0
    from twinview.pretrain.runs import load_trained_model

    _, model = load_trained_model(runs / "o")
    x = torch.randn(3, 3, 24, 24)
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model.backbone(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_refused_run_leaves_nothing_and_the_corrected_command_just_works(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = tmp_path / "runs"
    common = [f"train.output_dir={runs}", *TINY]
    assert main(["pretrain", "data.path=/typo", "train.run_name=x", *common]) == 2
    assert main(["pretrain", "data.path=/typo", *common]) == 2  # a timestamp name
    assert main(["pretrain", *common, f"data.path={image_folder}", "train.batch_size=500", "train.run_name=x"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not runs.exists() or not any(runs.iterdir())  # no run directory left behind
    (runs / "x").mkdir(parents=True)
    (runs / "x" / "config.yaml").write_text("left by an earlier version's refused start\n")
    assert main(["pretrain", f"data.path={image_folder}", "train.run_name=x", *common]) == 0
    assert (runs / "x" / "model.safetensors").is_file()
    assert main(["pretrain", f"data.path={image_folder}", "train.run_name=x", *common]) == 2  # now it holds a run
    assert "already holds a run" in capsys.readouterr().err


def test_settings_that_train_nothing_are_refused_and_library_noise_stays_out(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    common = [f"data.path={image_folder}", f"train.output_dir={tmp_path}", *TINY]
    assert main(["pretrain", *common, "train.epochs=0"]) == 2
    assert "train.epochs=0 must be >= 1" in capsys.readouterr().err
    assert main(["pretrain", *common, "train.max_steps_per_epoch=1"]) == 0  # a decay of one step
    assert "Cosine annealing scheduler" not in caplog.text + capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_warns_about_nothing_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`make demo` in miniature: the shipped demo recipe, cut to 3 steps; without a terminal the
    progress is plain lines, one per epoch."""
    assert main(["demo", "--output-dir", str(tmp_path), "train.epochs=2", "train.max_steps_per_epoch=3"]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "warning" not in out.lower() and "warning" not in err.lower()
    assert "  recipe     demo" in out and "  estimate   " in out
    assert "kNN on digits test" in out and "random-init backbone" in out
    assert [line.split(" in ")[0] for line in err.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/2: 3/3 steps (100%)",
        "epoch 2/2: 3/3 steps (100%)",
    ]
    assert "\r" not in err
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "eval.json").is_file()
