"""WebDataset tar shards built on the fly: names, shares per process and worker, bad samples and
shards, training and evaluation through them."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from twinview.pretrain.app.cli import main
from twinview.pretrain.config import load_config
from twinview.pretrain.data.folder import ImageFolderDataset, SkipLog
from twinview.pretrain.data.hf import HFImageDataset
from twinview.pretrain.data.shards import shard_stream
from twinview.pretrain.data.source import FOLDER, HF, SHARDS, resolve_source, scan_source, shard_files, source_kind
from twinview.pretrain.engine.train import train
from twinview.pretrain.validate import ConfigError, World, validate_data

from ..conftest import make_image_folder

SIZE = 24


def write_shards(root: Path, folder: Path, shards: int, bad: set[str] = frozenset()) -> list[list[str]]:
    """Packs a labelled image folder into ``root/train-NNNN.tar`` (samples dealt round-robin), each
    sample ``<class>_<file>.png`` + ``.cls``; keys in ``bad`` get bytes that are no image.

    Returns:
        The keys of each shard.
    """
    files = sorted(folder.rglob("*.png"))
    classes = sorted({f.parent.name for f in files})
    keys: list[list[str]] = [[] for _ in range(shards)]
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(root / f"train-{s:04d}.tar", "w")) for s in range(shards)]
        for i, f in enumerate(files):
            key = f"{f.parent.name}_{f.stem}"
            payload = b"no image here" if key in bad else f.read_bytes()
            for name, data in ((f"{key}.png", payload), (f"{key}.cls", str(classes.index(f.parent.name)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tars[i % shards].addfile(info, io.BytesIO(data))
            keys[i % shards].append(key)
    return keys


def image_key(image: torch.Tensor, by_pixels: dict[bytes, str]) -> str:
    return by_pixels[image.numpy().tobytes()]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", classes=3, per_class=8, size=SIZE)


@pytest.fixture
def pixels(folder: Path) -> dict[bytes, str]:
    """Each image's decoded pixels -> its sample key (the images are distinct noise)."""
    ds = ImageFolderDataset(scan_source(folder), SIZE)
    return {ds[i][0].numpy().tobytes(): f"{f.parent.name}_{f.stem}" for i, f in enumerate(ds.index.files)}


def test_shard_names_braces_globs_and_missing_files(tmp_path: Path) -> None:
    for s in range(3):
        (tmp_path / f"train-{s:06d}.tar").touch()
    files = [str(tmp_path / f"train-{s:06d}.tar") for s in range(3)]
    assert shard_files(str(tmp_path / "train-{000000..000002}.tar")) == files
    assert shard_files(str(tmp_path / "train-*.tar")) == files
    assert shard_files(str(tmp_path / "train-{000000,000002}.tar")) == [files[0], files[2]]
    with pytest.raises(FileNotFoundError, match=r"no shard file .*train-000003.tar, .*train-000004.tar"):
        shard_files(str(tmp_path / "train-{000000..000004}.tar"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        shard_files(str(tmp_path / "val-*.tar"))
    pattern = str(tmp_path / "train-{000000..000002}.tar")
    assert source_kind(pattern) == SHARDS and source_kind(str(tmp_path)) == FOLDER
    assert source_kind("hf:owner/name") == source_kind(str(tmp_path / "x.parquet")) == HF


def test_each_process_reads_its_own_shards_and_bad_samples_are_listed(
    folder: Path, pixels: dict[bytes, str], tmp_path: Path
) -> None:
    keys = write_shards(tmp_path, folder, shards=3, bad={"class_1_004"})
    pattern = str(tmp_path / "train-{0000..0002}.tar")
    log = SkipLog(tmp_path / "skipped")
    seen = []
    for rank in range(2):
        stream = iter(shard_stream(resolve_source(pattern), SIZE, rank=rank, world=2, skip_log=log))
        share = [k for s in range(rank, 3, 2) for k in keys[s] if k != "class_1_004"]
        got = [next(stream) for _ in range(len(share))]
        assert sorted(image_key(im, pixels) for im, _ in got) == sorted(share)  # one pass: each once
        assert all(label == int(image_key(im, pixels)[6]) for im, label in got)  # the .cls field
        seen += share
    assert sorted(seen) == sorted(k for s in keys for k in s if k != "class_1_004")
    (holder,) = (s for s in range(3) if "class_1_004" in keys[s])
    assert list(log.collect()) == [f"{tmp_path / f'train-{holder:04d}.tar'}#class_1_004"]


def test_a_truncated_shard_keeps_its_first_samples_and_the_stream_goes_on(
    folder: Path, pixels: dict[bytes, str], tmp_path: Path
) -> None:
    keys = write_shards(tmp_path, folder, shards=2)
    damaged = tmp_path / "train-0000.tar"
    with tarfile.open(damaged) as tar:
        fifth = tar.getmembers()[8]  # 4 whole samples of 2 members, then the 5th image cut short
    damaged.write_bytes(damaged.read_bytes()[: fifth.offset_data + 100])
    log = SkipLog(tmp_path / "skipped")
    stream = iter(shard_stream(resolve_source(str(tmp_path / "train-*.tar")), SIZE, skip_log=log))
    got = Counter(image_key(next(stream)[0], pixels) for _ in range(4 + len(keys[1])))
    assert set(got) == set(keys[0][:4]) | set(keys[1]) and set(got.values()) == {1}
    (reason,) = log.collect().values()
    assert list(log.collect()) == [str(damaged)] and reason.startswith("shard unreadable after 4 samples")


def test_dataloader_workers_split_a_process_share(folder: Path, pixels: dict[bytes, str], tmp_path: Path) -> None:
    keys = write_shards(tmp_path, folder, shards=4)  # 6 samples each: 12 per worker
    loader = DataLoader(shard_stream(resolve_source(str(tmp_path / "train-*.tar")), SIZE), batch_size=6, num_workers=2)
    batches = iter(loader)
    got = [image_key(im, pixels) for _ in range(4) for im in next(batches)[0]]
    assert sorted(got) == sorted(k for s in keys for k in s)


@pytest.mark.slow
def test_evaluation_reads_shards_as_the_folder_they_were_packed_from(folder: Path, tmp_path: Path) -> None:
    write_shards(tmp_path, folder, shards=2)
    shards = HFImageDataset(resolve_source(str(tmp_path / "train-{0000..0001}.tar")), SIZE)
    files = ImageFolderDataset(scan_source(folder), SIZE)
    assert len(shards) == len(files) and shards.index.classes == ("0", "1", "2")
    by_name = {f"{f.parent.name}_{f.stem}": i for i, f in enumerate(files.index.files)}
    for i, name in enumerate(shards.index.files):
        url, key = str(name).split("#")
        image, label = shards[i]
        reference, ref_label = files[by_name[key]]
        assert url.endswith(".tar") and torch.equal(image, reference) and label == ref_label


@pytest.mark.slow
def test_training_on_shards_needs_an_epoch_length_and_lists_bad_samples(folder: Path, tmp_path: Path) -> None:
    write_shards(tmp_path, folder, shards=3, bad={"class_0_001"})
    common = [
        f"data.path={tmp_path / 'train-{0000..0002}.tar'}",
        f"data.image_size={SIZE}",
        "data.num_workers=0",
        "train.batch_size=8",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    with pytest.raises(ConfigError, match=r"tar shards \(always streamed\) has no epoch length"):
        load_config(None, common)  # told from the path, before anything is read
    with pytest.raises(ConfigError, match="P x K batches"):
        load_config(None, [*common, "train.max_steps_per_epoch=4", "objective.name=supcon"])
    cfg = load_config(None, [*common, "train.max_steps_per_epoch=4", "train.epochs=2"])
    with pytest.raises(ConfigError, match="3 shards for 4 processes"):
        validate_data(cfg, World(processes=4), resolve_source(cfg.data.path))
    run = tmp_path / "runs" / "shards"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [4, 8]
    assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()
    assert f"{tmp_path / 'train-0001.tar'}#class_0_001" in (run / "skipped_files.txt").read_text()  # file 1 of 24

    pattern = str(tmp_path / "train-*.tar")  # evaluation reads shards as well (the bad sample: replaced)
    assert main(["evaluate", str(run), "--train", pattern, "--test", pattern]) == 0
    result = json.loads((run / "eval.json").read_text())["pretrained"]
    assert result["knn_top1"] > 1 / 3  # the classes are visible in the images


@pytest.mark.slow
def test_a_streamed_run_whose_reader_goes_away_still_exits(folder: Path, tmp_path: Path) -> None:
    """``twinview pretrain ... | head``: the pipe closes, the next print fails, and the process must
    still end. The stream's DataLoader workers ignore SIGTERM; left alive, they kept the exit
    handler waiting forever."""
    import subprocess
    import sys

    write_shards(tmp_path, folder, shards=2)
    cmd = [
        *(sys.executable, "-m", "twinview.pretrain.app.cli", "pretrain"),
        f"data.path={tmp_path / 'train-*.tar'}",
        f"data.image_size={SIZE}",
        "data.num_workers=2",
        "train.batch_size=8",
        "train.epochs=1",
        "train.max_steps_per_epoch=20",
        "train.log_every=5",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert run.stdout is not None
    lines = iter(run.stdout.readline, b"")
    assert any(line.startswith(b"  estimate") for line in lines)  # the stream's workers are running
    run.stdout.close()  # the reader goes away: the next print fails
    try:
        run.wait(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError("the run did not exit after its output pipe closed") from None


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_reads_what_tarfile_writes(tmp_path: Path, tar_format: int) -> None:
    """Names of every length (the ustar prefix, GNU long names, pax paths), empty files, directories
    and metadata skipped, sizes, in order: the same files as the standard tarfile module reads."""
    from twinview.pretrain.data.shards import TarDamaged, tar_files

    rng = np.random.default_rng(0)
    files = {
        "a.jpg": rng.bytes(1000),
        "a.cls": b"3",
        "empty.txt": b"",
        ("d" * 60) + "/" + ("e" * 70) + ".png": rng.bytes(513),  # 135 characters: ustar prefix or a long name
        ("f" * 150) + ".png": rng.bytes(512),  # no "/" to split at: only GNU and pax can name it
        "__meta__": b"skipped",
    }
    path = tmp_path / "t.tar"
    written = []
    with tarfile.open(path, "w", format=tar_format) as tar:
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in files.items():
            if tar_format == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name:
                continue  # ustar cannot store it
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            written.append(name)
    with path.open("rb") as f:
        got = [(m["fname"], m["data"]) for m in tar_files(f)]
    assert got == [(n, files[n]) for n in written if n != "__meta__"]
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        second = tar.getmembers()[2]  # a.cls
    for cut in (second.offset + 100, 1024 + 500):  # in a header; in a.jpg's data
        stream = tar_files(io.BytesIO(whole[:cut]))
        with pytest.raises(TarDamaged):
            list(stream)
