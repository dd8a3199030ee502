"""Images per second delivered to the training step: JPEG decoding in workers vs the decoded cache.

Three paths, on the same files, in the same run:

* ``jpeg``: ``ImageFolderDataset`` (PIL decode + resize) in a DataLoader with ``--workers`` workers;
* ``disk_cache``: ``data.cache=disk``, the memory-mapped uint8 array, read a whole batch at a time
  (``__getitems__``) by a DataLoader with no workers (the reads are memory copies);
* ``device_cache``: ``data.cache=device``, the array on the training device, batches indexed there;
* ``shards``: the same JPEGs packed into WebDataset tar shards (``--shards``, written once into the
  cache), streamed through the ``datasets`` webdataset builder as ``data.path=...tar`` trains
  (:mod:`twinview.pretrain.data.shards`); an "epoch" is as many batches as the folder's.

Each pass iterates one epoch of shuffled batches of ``--batch`` and touches every batch (a sum on
the device), so the figure is what a training step could consume. Median of ``--repeats`` epochs
after one warm-up epoch; the cache is built before timing (its build time is reported too).
Data sets: real CIFAR-10 (the 50,000 training JPEGs, 32 px) when the archive is present, and
synthetic 256 px JPEGs the benchmark writes (``--synthetic N``) loaded at 224 px.

Usage: python bench/data.py [--workers 2] [--batch 256] [--synthetic 2000] [--shards 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from host import host_kind
from PIL import Image
from torch.utils.data import DataLoader

from twinview.pretrain.data.builtin import cache_dir, extract_archive
from twinview.pretrain.data.cache import CachedDataset, DeviceBatches, batched_collate, build_or_load
from twinview.pretrain.data.folder import ImageFolderDataset, worker_init
from twinview.pretrain.data.shards import shard_stream
from twinview.pretrain.data.source import resolve_source, scan_source

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


def synthetic_jpegs(n: int, side: int = 256) -> Path:
    """Writes ``n`` smooth colour JPEGs of ``side`` px once into the cache; returns the folder."""
    folder = cache_dir() / f"bench-jpeg-{side}-{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class_{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC).save(sub / f"{i:05d}.jpg", quality=90)
    done.touch()
    return folder


def tar_shards(folder: Path, shards: int) -> str:
    """Packs the folder's images into ``shards`` WebDataset tars (``<key>.<ext>`` + ``<key>.cls``),
    once, into the cache; returns the ``data.path`` pattern."""
    index = scan_source(folder)
    out = cache_dir() / f"bench-shards-{folder.name}-{len(index.files)}-{shards}"
    pattern = str(out / f"train-{{000000..{shards - 1:06d}}}.tar")
    if (out / ".complete").is_file():
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(out / f"train-{s:06d}.tar", "w")) for s in range(shards)]
        for i, (f, label) in enumerate(zip(index.files, index.labels, strict=True)):
            key = f"{i:07d}"
            for name, data in ((f"{key}{f.suffix.lower()}", f.read_bytes()), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tars[i % shards].addfile(info, io.BytesIO(data))
    (out / ".complete").touch()
    return pattern


class FixedEpochs:
    """``steps`` batches of an endless loader per pass (as the training loop cuts a stream)."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self.it, self.steps = iter(loader), steps

    def __iter__(self) -> Any:
        for _ in range(self.steps):
            yield next(self.it)


def epoch_seconds(batches: Iterable[Any], device: torch.device, repeats: int) -> tuple[float, int]:
    """Median seconds of one epoch over ``repeats`` after a warm-up, and the images per epoch."""
    times, count = [], 0
    for r in range(repeats + 1):
        total = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        start = time.perf_counter()
        for images, _ in batches:
            images = images.to(device, non_blocking=True)
            total += images[:, 0, 0, 0].long().sum()  # touch the batch where the step would run
            count += images.shape[0]
        total.item()
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times), count


def measure(
    folder: Path, size: int, workers: int, batch: int, repeats: int, device: torch.device, shards: int
) -> dict[str, Any]:
    row: dict[str, Any] = {"data": str(folder), "image_size": size}
    jpeg = ImageFolderDataset(scan_source(folder), size)
    row["images"] = len(jpeg)
    loader = DataLoader(
        jpeg,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=worker_init,
        persistent_workers=workers > 0,
    )
    seconds, n = epoch_seconds(loader, device, repeats)
    row["jpeg_images_per_s"] = n / seconds
    del loader

    start = time.perf_counter()
    cache = build_or_load(scan_source(folder), size, workers=workers)
    row["cache_build_or_load_s"] = time.perf_counter() - start
    row["cache_mb"] = cache.path.stat().st_size / 2**20
    cached = DataLoader(
        CachedDataset(cache), batch_size=batch, shuffle=True, drop_last=True, num_workers=0, collate_fn=batched_collate
    )
    seconds, n = epoch_seconds(cached, device, repeats)
    row["disk_cache_images_per_s"] = n / seconds

    on_device = DeviceBatches(cache, device, batch, seed=0)
    seconds, n = epoch_seconds(on_device, device, repeats)
    row["device_cache_images_per_s"] = n / seconds
    if shards:
        stream = shard_stream(resolve_source(tar_shards(folder, shards)), size)
        loader = DataLoader(stream, batch_size=batch, num_workers=workers, worker_init_fn=worker_init)
        seconds, n = epoch_seconds(FixedEpochs(loader, len(jpeg) // batch), device, repeats)
        row["shards"] = shards
        row["shards_images_per_s"] = n / seconds
        row["shards_vs_jpeg"] = row["shards_images_per_s"] / row["jpeg_images_per_s"]
        del loader
    row["disk_cache_vs_jpeg"] = row["disk_cache_images_per_s"] / row["jpeg_images_per_s"]
    row["device_cache_vs_jpeg"] = row["device_cache_images_per_s"] / row["jpeg_images_per_s"]
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path(os.environ.get("TWINVIEW_CIFAR10", DEFAULT_ARCHIVE)))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=2000, help="number of 256 px JPEGs for the 224 px case")
    parser.add_argument("--shards", type=int, default=16, help="tar shards for the streamed case (0: skip it)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    if args.archive.is_file():
        root = extract_archive(args.archive) / "cifar10-jpeg"
        results.append(measure(root / "train", 32, args.workers, args.batch, args.repeats, device, args.shards))
    else:
        print(f"CIFAR-10 archive not found at {args.archive}; skipping that case", file=sys.stderr)
    if args.synthetic:
        results.append(
            measure(synthetic_jpegs(args.synthetic), 224, args.workers, args.batch, args.repeats, device, args.shards)
        )
    print(
        json.dumps(
            {
                "benchmark": "data",
                "machine": f"{host_kind()}, torch {torch.__version__}, device={device}",
                "workers": args.workers,
                "batch": args.batch,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
