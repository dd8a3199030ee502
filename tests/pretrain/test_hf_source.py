"""Hugging Face sources built locally (no network): saved data sets, parquet, imagefolder, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from twinview.pretrain.config import load_config
from twinview.pretrain.data.hf import HFImageDataset, pick_columns
from twinview.pretrain.data.source import FOLDER, HF, resolve_source, source_kind
from twinview.pretrain.engine.train import train

SMALL = [
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
]


@pytest.fixture
def hf_dataset(image_folder: Path) -> datasets.Dataset:
    files = sorted(image_folder.rglob("*.png"))
    classes = sorted({f.parent.name for f in files})
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=classes), "caption": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {
            "img": [str(f) for f in files],
            "label": [classes.index(f.parent.name) for f in files],
            "caption": [f.name for f in files],
        },
        features=features,
    )


def _train(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    cfg = load_config(None, [*SMALL, f"train.output_dir={tmp_path}", f"train.run_name={name}", *extra])
    train(cfg, tmp_path / name)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_saved_dataset_gives_the_same_images_and_labels(
    hf_dataset: datasets.Dataset, image_folder: Path, tmp_path: Path
) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    assert source_kind(str(tmp_path / "saved")) == HF and source_kind(str(image_folder)) == FOLDER
    ds = HFImageDataset(resolve_source(str(tmp_path / "saved")), 24)
    assert (ds.image_column, ds.label_column) == ("img", "label") and ds.index.classes == (
        "class_0",
        "class_1",
        "class_2",
    )
    image, label = ds[9]
    expected = torch.from_numpy(np.array(Image.open(hf_dataset[9]["img"].filename).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(image, expected) and label == hf_dataset[9]["label"]


@pytest.mark.slow
def test_training_from_saved_parquet_and_imagefolder_sources(
    hf_dataset: datasets.Dataset, image_folder: Path, tmp_path: Path
) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    hf_dataset.to_parquet(str(tmp_path / "data.parquet"))
    for name, path in [
        ("saved", tmp_path / "saved"),
        ("parquet", tmp_path / "data.parquet"),
        ("imagefolder", f"hf:imagefolder:{image_folder}"),
    ]:
        records = _train(tmp_path / "runs", name, f"data.path={path}")
        assert records[-1]["kind"] == "epoch" and records[-1]["step"] == 3, name


@pytest.mark.slow
def test_supervised_objective_reads_hf_labels(hf_dataset: datasets.Dataset, tmp_path: Path) -> None:
    """P x K batches of the data set's own labels: every image in a batch carries the label the data
    set gives it, and each batch holds 2 classes x 4 images."""
    from accelerate import Accelerator

    from twinview.pretrain.data.folder import SkipLog
    from twinview.pretrain.data.loaders import build_batches

    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    cfg = load_config(None, [*SMALL, f"data.path={tmp_path / 'saved'}", "objective.name=supcon"])
    source = resolve_source(cfg.data.path)
    assert source.label_column == "label" and source.survey is not None and source.survey.classes == 3
    accelerator = Accelerator(cpu=True)
    batches = build_batches(cfg, source, accelerator, SkipLog(tmp_path / "skipped")).prepare(accelerator)
    batches.set_epoch(0)
    truth = {
        image.tobytes(): label for image, label in ((np.array(r["img"].convert("RGB")), r["label"]) for r in hf_dataset)
    }
    seen = 0
    for images, labels in batches:
        per_class = torch.bincount(labels, minlength=3).tolist()
        assert sorted(per_class) == [0, 4, 4]  # P=2 classes x K=4 images
        for image, label in zip(images, labels.tolist(), strict=True):
            assert truth[image.permute(1, 2, 0).contiguous().numpy().tobytes()] == label
        seen += 1
    assert seen == 3
    records = _train(tmp_path / "runs", "supcon", f"data.path={tmp_path / 'saved'}", "objective.name=supcon")
    assert records[-1]["step"] == 3 and records[-1]["loss"] is not None


@pytest.mark.slow
def test_streaming_needs_an_epoch_length_and_then_trains(hf_dataset: datasets.Dataset, tmp_path: Path) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        _train(tmp_path / "runs", "s0", f"data.path={tmp_path / 'saved'}", "data.streaming=true")
    records = _train(
        tmp_path / "runs",
        "s1",
        f"data.path={tmp_path / 'saved'}",
        "data.streaming=true",
        "train.max_steps_per_epoch=5",
        "train.epochs=2",
    )
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [5, 10]
    records = _train(
        tmp_path / "runs",
        "s2",
        f"data.path={tmp_path / 'saved'}",
        "data.streaming=true",
        "train.max_steps_per_epoch=5",
        "train.epochs=2",
        "train.grad_accumulation=2",
    )
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [5, 10]  # optimiser steps, 2 batches each


def test_column_detection_and_its_errors(hf_dataset: datasets.Dataset) -> None:
    assert pick_columns(hf_dataset.features, "", "") == ("img", "label")
    two = datasets.Features({"a": datasets.Image(), "b": datasets.Image()})
    with pytest.raises(ValueError, match=r"Image features: a, b.*data.image_column"):
        pick_columns(two, "", "")
    assert pick_columns(two, "b", "") == ("b", None)
    with pytest.raises(ValueError, match="'nope' is not a column"):
        pick_columns(two, "nope", "")


def test_a_corrupt_row_is_replaced_and_listed(hf_dataset: datasets.Dataset, tmp_path: Path) -> None:
    from twinview.pretrain.data.decode import BadImage
    from twinview.pretrain.data.folder import SkipLog

    rows = hf_dataset.cast_column("img", datasets.Image(decode=False))[:]
    rows["img"][4] = {"path": None, "bytes": b"not an image"}
    broken = datasets.Dataset.from_dict(rows, features=hf_dataset.features)
    broken.save_to_disk(str(tmp_path / "broken"))
    log = SkipLog(tmp_path / "skipped")
    ds = HFImageDataset(resolve_source(str(tmp_path / "broken")), 24, skip_log=log)
    image, label = ds[4]  # the next row stands in
    assert image.shape == (3, 24, 24) and label == hf_dataset[5]["label"]
    assert list(log.collect()) == [f"{tmp_path / 'broken'}#4"]
    with pytest.raises(BadImage, match="#4: cannot decode"):
        HFImageDataset(resolve_source(str(tmp_path / "broken")), 24, strict=True)[4]
