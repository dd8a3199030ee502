"""The start of a run: the data survey, data.image_size=auto, the summary block and its warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from twinview.evaluate.progress import Progress, human_duration
from twinview.pretrain.config import load_config
from twinview.pretrain.data.source import ImageSize, resolve_source
from twinview.pretrain.data.survey import DataSurvey, auto_image_size
from twinview.pretrain.distributed import cpu_computes_bf16
from twinview.pretrain.engine.run_start import (
    StartInfo,
    cheaper_choices,
    estimate_lines,
    final_feature_side,
    resolve_precision,
    start_warnings,
)
from twinview.pretrain.engine.train import train
from twinview.pretrain.models import create_backbone
from twinview.pretrain.validate import World

from ..conftest import make_image_folder


def _sized(root: Path, sizes: list[tuple[int, int]]) -> Path:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize(
    ("sides", "size", "why"),
    [
        ([96] * 5, 96, "median shorter side of 5 sampled images is 96 px, rounded down"),
        ([100, 120, 130], 96, "is 120 px, rounded down to a multiple of 32"),
        ([480, 500, 1024], 224, "capped at 224 px"),
        ([20, 28], 32, "raised to the minimum of 32 px"),
    ],
)
def test_auto_image_size_is_the_median_shorter_side_rounded_down(sides: list[int], size: int, why: str) -> None:
    got, reason = auto_image_size(DataSurvey("/x", len(sides), 0, tuple(sides)))
    assert got == size and why in reason


def test_the_survey_counts_images_and_classes_and_reads_sizes_from_headers(tmp_path: Path) -> None:
    root = _sized(tmp_path / "img", [(40, 30), (64, 80), (50, 50), (100, 20)])
    found = resolve_source(str(root)).survey
    assert found is not None
    assert (found.images, found.classes, sorted(found.shorter_sides)) == (4, 2, [20, 30, 50, 64])
    assert found.median_side == 40 and "4 images, 2 classes; shorter side 20-64 px, median 40" in found.describe()


@pytest.mark.slow
def test_a_run_with_no_size_setting_picks_one_prints_why_and_saves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _sized(tmp_path / "img", [(72, 90)] * 12 + [(300, 200)] * 4)  # median shorter side 72 -> 64
    cfg = load_config(
        None,
        [
            f"data.path={root}",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            f"train.output_dir={tmp_path}",
            "train.mixed_precision=auto",
        ],
    )
    assert cfg.data.image_size == "auto"
    train(cfg, tmp_path / "run", recipe="(test)")
    out = capsys.readouterr().out
    assert "data.image_size=auto: the median shorter side of 16 sampled images is 72 px" in out
    assert "16 images, 2 classes; shorter side 72-200 px" in out and "recipe     (test)" in out
    assert "batch      8 global = 8 per process x 1 process(es) x 1 pass(es)" in out
    assert "steps      2 per epoch x 1 epochs = 2" in out
    assert "warning: an epoch of 16 images is only 2 optimiser step(s)" in out
    assert "  estimate   " in out and " for 1 epoch (" in out and " s per epoch, " in out  # once step 2 ended
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 64
    precision = "bf16" if cpu_computes_bf16() else "no"  # this host's CPU decides
    assert saved["train"]["mixed_precision"] == precision
    assert f"precision {precision} (train.mixed_precision=auto: " in out


@pytest.mark.parametrize(
    "world,chosen",
    [
        (World(device_type="cuda", bf16_supported=True, bf16_native=True), "bf16"),
        (World(device_type="cuda", bf16_supported=False), "fp16"),
        (World(device_type="cpu", bf16_native=True), "bf16"),
        (World(device_type="cpu", bf16_native=False), "no"),
        (World(device_type="mps"), "no"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_device_computes_it(world: World, chosen: str) -> None:
    cfg, note = resolve_precision(load_config(None, ["data.path=x", "train.mixed_precision=auto"]), world)
    assert cfg.train.mixed_precision == chosen and note.startswith(f"{chosen} (train.mixed_precision=auto")
    explicit, note = resolve_precision(load_config(None, ["data.path=x", "train.mixed_precision=no"]), world)
    assert explicit.train.mixed_precision == "no" and note == "no (train.mixed_precision)"


def test_warnings_name_the_setting_to_change(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "img", classes=2, per_class=4, size=24)
    source = resolve_source(str(folder))
    chosen = ImageSize(64, "", auto=False)
    cfg = load_config(None, [f"data.path={folder}", "data.image_size=64"])
    backbone = create_backbone(cfg.model)
    (upscaled,) = start_warnings(cfg, StartInfo(source, chosen), backbone, steps_per_epoch=100)
    assert "upscaled to data.image_size=64" in upscaled and "data.image_size=auto" in upscaled
    small = load_config(None, [f"data.path={folder}", "data.image_size=32"])
    auto = StartInfo(source, ImageSize(32, "", auto=True))
    warnings = start_warnings(small, auto, backbone, steps_per_epoch=100)
    assert final_feature_side(backbone, 32) == 1 and final_feature_side(backbone, 64) == 2
    assert any("reduces 32 px images to 1x1" in w and "model.cifar_stem=true" in w for w in warnings)
    cifar = create_backbone(load_config(None, ["data.path=/x", "model.cifar_stem=true"]).model)
    assert final_feature_side(cifar, 32) == 4
    assert not start_warnings(small, auto, cifar, steps_per_epoch=100)
    # a recipe that sets 32 px with the standard stem chose it (the demo, simclr-cifar10): no warning
    recipe = StartInfo(source, ImageSize(32, "", auto=False))
    assert not start_warnings(small, recipe, backbone, steps_per_epoch=100, recipe="demo")
    assert start_warnings(small, recipe, backbone, steps_per_epoch=100, recipe="") == warnings


def test_a_streamed_source_is_sampled_from_its_first_rows_not_counted(tmp_path: Path) -> None:
    import datasets

    folder = make_image_folder(tmp_path / "img", classes=2, per_class=4, size=24)
    files = sorted(folder.rglob("*.png"))
    data = datasets.Dataset.from_dict(
        {"img": [str(f) for f in files]}, features=datasets.Features({"img": datasets.Image()})
    )
    data.to_parquet(str(tmp_path / "d.parquet"))
    streamed = resolve_source(str(tmp_path / "d.parquet"), streaming=True).survey
    mapped = resolve_source(str(tmp_path / "d.parquet")).survey
    assert streamed is not None and mapped is not None
    assert streamed.images is None and mapped.images == 8
    assert streamed.shorter_sides == mapped.shorter_sides == (24,) * 8


def test_the_estimate_is_in_hours_and_minutes_and_a_long_cpu_run_names_cheaper_choices() -> None:
    cfg = load_config(None, ["data.path=/photos", "data.image_size=224", "train.epochs=10"])
    cpu, gpu = World(device_type="cpu"), World(device_type="cuda")
    lines = estimate_lines(cfg, cpu, "", 254, 2540, 256, per_step=7.0)  # 17,780 s
    assert lines[0] == "  estimate   4 h 56 min for 10 epochs (1778 s per epoch, 7.00 s per step, 37 images/s)"
    assert "that is long for a CPU" in lines[1]
    # the views' area: (96 / 224)^2 of 17,780 s = 54 min; the photo recipe's 64 px views: 24 min
    assert lines[2].split() == ["data.image_size=96", "about", "54", "min"]
    assert lines[3].split()[:4] == ["--config", "moco-v2-photos", "about", "24"] and "64 px views" in lines[3]
    assert estimate_lines(cfg, gpu, "", 254, 2540, 256, per_step=7.0) == lines[:1]  # a GPU: no advice
    short = estimate_lines(cfg, cpu, "", 254, 2540, 256, per_step=1.0)  # 42 min: no advice either
    assert short == ["  estimate   42 min for 10 epochs (254 s per epoch, 1.00 s per step, 256 images/s)"]
    resumed = estimate_lines(cfg, cpu, "", 254, 100, 256, per_step=1.0)
    assert resumed[0].startswith("  estimate   1 min 40 s for the 100 steps left")
    photos = load_config("moco-v2-photos", ["data.path=/photos"])  # already the photo recipe at 64 px
    assert cheaper_choices(photos, "moco-v2-photos") == []
    small = load_config(None, ["data.path=/photos", "data.image_size=64"])
    assert cheaper_choices(small, "") == [("data.image_size=32", 0.25, "")]  # the photo recipe's views are not smaller


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (59, "59 s"),
        (61, "1 min 1 s"),
        (599, "9 min 59 s"),
        (3569, "59 min"),
        (3600, "1 h 0 min"),
        (17780, "4 h 56 min"),
    ],
)
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_progress_in_a_file_is_a_line_a_minute_and_one_at_the_end() -> None:
    import io

    out = io.StringIO()  # not a terminal
    bar = Progress(10, "epoch 1/2", unit="steps", stream=out, every_s=3600.0)
    for _ in range(10):
        bar.update()
        bar.set_postfix(loss="1.2345")
    bar.close()
    bar.close()
    (line,) = out.getvalue().splitlines()  # none before the minute, one at the end, once
    assert line.startswith("epoch 1/2: 10/10 steps (100%) in 0 s") and line.endswith("loss 1.2345")
    assert "\r" not in out.getvalue()
    every = io.StringIO()
    often = Progress(4, "embed", unit="img", initial=1, stream=every, every_s=0.0)
    often.update(2)
    often.close()
    assert [ln.split(" in ")[0] for ln in every.getvalue().splitlines()] == [
        "embed: 3/4 img (75%)",
        "embed: 3/4 img (75%)",
    ]
    assert "left" in every.getvalue().splitlines()[0]
    quiet = io.StringIO()
    hidden = Progress(4, "x", stream=quiet, enabled=False, every_s=0.0)
    hidden.update()
    hidden.write("not shown")
    hidden.close()
    assert quiet.getvalue() == ""
