"""``--resume auto`` / ``train.resume=auto``: the one command a restarted or requeued job repeats.
It starts the run, continues it (bitwise), does nothing once it finished, and refuses a directory
that holds a run of other settings, naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.app.cli import main
from twinview.pretrain.config import ConfigError, load_config
from twinview.pretrain.runs import auto_run_dir, checkpoints, settings_differ

SMALL = [
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "optim.lr=0.1",
]


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={folder}", f"train.output_dir={out}", "train.run_name=r", *SMALL, *extra]


def test_auto_needs_a_run_name_and_takes_two_values(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.resume=auto needs train\.run_name"):
        load_config(None, [f"data.path={image_folder}", "train.resume=auto"])
    with pytest.raises(ConfigError, match=r"'train\.resume'"):
        load_config(None, [f"data.path={image_folder}", "train.resume=yes"])


def test_settings_differ_names_keys_and_leaves_out_auto_and_resume(image_folder: Path, tmp_path: Path) -> None:
    saved = load_config(None, _args(image_folder, tmp_path, "train.epochs=3"))
    assert settings_differ(saved, load_config(None, _args(image_folder, tmp_path, "train.epochs=3"))) == []
    wanted = load_config(
        None, _args(image_folder, tmp_path, "train.epochs=4", "data.image_size=auto", "train.resume=auto")
    )
    assert settings_differ(saved, wanted) == ["train.epochs: 3 -> 4"]  # image_size auto: resolved at the start


def test_auto_starts_a_new_run_and_clears_what_a_failed_start_left(image_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(None, _args(image_folder, tmp_path, "train.resume=auto"))
    start = auto_run_dir(cfg)
    assert start.run_dir == tmp_path / "r" and not start.resume and start.run_dir.is_dir()
    (start.run_dir / "config.yaml").write_text("left by a start that failed before its first checkpoint\n")
    (start.run_dir / "metrics.jsonl").write_text("{}\n")
    again = auto_run_dir(cfg)
    assert not again.resume and not (again.run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_same_command_starts_continues_and_then_has_nothing_to_do(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Interrupted after epoch 1 (only that checkpoint kept), the same command continues to the
    weights of an uninterrupted run; run again once finished, it trains nothing; asked with other
    settings, it refuses before any compute."""
    runs = tmp_path / "runs"
    command = ["pretrain", "--resume", "auto", *_args(image_folder, runs, "train.epochs=2")]
    assert main(command) == 0
    run_dir = runs / "r"
    straight = load_file(run_dir / "model.safetensors")
    # as if the job had been stopped after its first epoch
    for newer in checkpoints(run_dir)[1:]:
        for f in sorted(newer.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        newer.rmdir()
    (run_dir / "model.safetensors").unlink()
    capsys.readouterr()

    assert main(command) == 0
    assert "Continuing" in capsys.readouterr().out
    resumed = load_file(run_dir / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert epochs == [1, 2]  # the redone epoch is logged once

    assert main(command) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["pretrain", "--resume", "auto", *_args(image_folder, runs, "train.epochs=3")]) != 0
    err = capsys.readouterr().err
    assert "train.epochs: 2 -> 3" in err and "--resume" in err
