"""The decoded cache: built once, reused, rebuilt on change, safe with concurrent builders; training from it."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.data.cache import CachedDataset, DeviceBatches, build_or_load, cache_key
from twinview.pretrain.data.decode import BadImage, decode_image
from twinview.pretrain.data.source import scan_source
from twinview.pretrain.engine.train import train


def test_cache_holds_the_decoded_images_and_is_reused(image_folder: Path, tmp_path: Path) -> None:
    index = scan_source(image_folder)
    cache = build_or_load(index, 16, workers=2, root=tmp_path)
    assert cache.images.shape == (24, 16, 16, 3) and len(cache.kept) == 24 and not cache.skipped
    for i in (0, 7, 23):
        assert np.array_equal(cache.images[cache.kept[i]], decode_image(index.files[i], 16))
    image, label = CachedDataset(cache)[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == index.labels[5]
    built = cache.path.stat().st_mtime_ns
    again = build_or_load(scan_source(image_folder), 16, root=tmp_path)
    assert again.path == cache.path and again.path.stat().st_mtime_ns == built  # reused, not rebuilt


def test_a_changed_file_or_size_gets_a_new_cache(image_folder: Path, tmp_path: Path) -> None:
    index = scan_source(image_folder)
    key = cache_key(index, 16)
    assert cache_key(index, 24) != key
    target = index.files[3]
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache_key(scan_source(image_folder), 16) != key


def test_bad_files_are_left_out_and_listed_and_strict_fails(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cache = build_or_load(scan_source(image_folder), 16, workers=1, root=tmp_path)
    assert len(cache.kept) == 24 and list(cache.skipped) == [str(image_folder / "class_0" / "broken.jpg")]
    assert "broken.jpg" not in {p.name for p in cache.index.files}
    with pytest.raises(BadImage, match=r"broken.jpg"):
        build_or_load(scan_source(image_folder), 16, strict=True, root=tmp_path)


def _build_in_child(folder: str, root: str, out: multiprocessing.Queue) -> None:
    out.put(str(build_or_load(scan_source(folder), 12, workers=2, root=Path(root)).path))


def test_concurrent_builders_share_one_build(image_folder: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    root = tmp_path / "cache"
    children = [ctx.Process(target=_build_in_child, args=(str(image_folder), str(root), out)) for _ in range(2)]
    for c in children:
        c.start()
    paths = [out.get(timeout=120) for _ in children]
    for c in children:
        c.join()
    assert paths[0] == paths[1]
    assert sorted(p.suffix for p in root.iterdir()) == [".json", ".lock", ".npy"]  # no temporaries left
    assert len(json.loads(Path(paths[0]).with_suffix(".json").read_text())["kept"]) == 24


def test_device_batches_cover_each_process_share_once_per_epoch(image_folder: Path, tmp_path: Path) -> None:
    cache = build_or_load(scan_source(image_folder), 8, workers=1, root=tmp_path)
    seen = []
    for rank in range(2):
        batches = DeviceBatches(cache, torch.device("cpu"), 4, seed=0, rank=rank, world=2)
        assert len(batches) == 3
        for images, labels in batches:
            assert images.shape == (4, 3, 8, 8) and labels.shape == (4,)
            seen += [tuple(img.flatten()[:12].tolist()) for img in images]
    assert len(seen) == 24  # 2 processes x 3 batches x 4: the whole data set, each image once


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disk", "device"])
def test_training_from_the_cache_lists_skipped_files(image_folder: Path, tmp_path: Path, mode: str) -> None:
    (image_folder / "class_1" / "empty.png").write_bytes(b"")
    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            f"data.cache={mode}",
            "data.image_size=24",
            "data.num_workers=1",
            "train.batch_size=8",
            "train.epochs=1",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            f"train.output_dir={tmp_path}",
            "train.run_name=r",
        ],
    )
    train(cfg, tmp_path / "r")
    listed = (tmp_path / "r" / "skipped_files.txt").read_text()
    assert listed == f"{image_folder / 'class_1' / 'empty.png'}\tempty file (0 bytes)\n"
    epochs = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line
    ]
    assert epochs[-1]["skipped_files"] == 1 and epochs[-1]["step"] == 3


@pytest.mark.slow
def test_training_without_cache_skips_a_bad_file_mid_epoch(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "class_2" / "fake.jpg").write_text("not a jpeg")
    cfg = load_config(
        None,
        [
            f"data.path={image_folder}",
            "data.image_size=24",
            "data.num_workers=2",
            "train.batch_size=5",
            "train.epochs=1",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            f"train.output_dir={tmp_path}",
            "train.run_name=r",
        ],
    )
    train(cfg, tmp_path / "r")
    assert "fake.jpg\tnot an image" in (tmp_path / "r" / "skipped_files.txt").read_text()
    strict = load_config(
        None,
        [
            f"data.path={image_folder}",
            "data.image_size=24",
            "data.num_workers=0",
            "data.strict=true",
            "train.batch_size=25",
            "train.epochs=1",
            f"train.output_dir={tmp_path}",
            "train.run_name=s",
        ],
    )
    with pytest.raises(BadImage, match=r"fake.jpg"):
        train(strict, tmp_path / "s")


def test_batched_reads_equal_item_reads_in_the_batch_order(image_folder: Path, tmp_path: Path) -> None:
    dataset = CachedDataset(build_or_load(scan_source(image_folder), 8, workers=1, root=tmp_path))
    indices = [17, 3, 9, 3, 0]
    images, labels = dataset.__getitems__(indices)
    assert images.shape == (5, 3, 8, 8)
    for row, i in enumerate(indices):
        item, label = dataset[i]
        assert torch.equal(images[row], item) and labels[row].item() == label


def test_device_batches_deal_p_x_k_batches_round_robin(image_folder: Path, tmp_path: Path) -> None:
    from twinview.pretrain.data.pk_sampler import PKBatchSampler

    cache = build_or_load(scan_source(image_folder), 8, workers=1, root=tmp_path)
    single = list(PKBatchSampler(cache.index.labels, 2, 2, seed=3))  # 6 batches of 4
    got = []
    for rank in range(2):
        batches = DeviceBatches(
            cache,
            torch.device("cpu"),
            4,
            seed=0,
            rank=rank,
            world=2,
            batch_sampler=PKBatchSampler(cache.index.labels, 2, 2, seed=3),
        )
        assert len(batches) == 3  # half of the sampler's batches each, not all of them
        got.append([labels.tolist() for _, labels in batches])
    expected = [[[cache.index.labels[i] for i in b] for b in single[r::2]] for r in range(2)]
    assert got == expected
