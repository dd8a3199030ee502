"""The decoded cache: every image decoded and resized once into a memory-mapped uint8 array.

``data.cache=disk`` reads batches from ``CACHE/decoded/<key>.npy`` (no decoding after the first
run); ``data.cache=device`` holds that array on the training device and indexes batches there,
with no DataLoader workers at all. The key hashes the file list, every file's size and mtime, the
labels and the image size, so a changed data set gets a new cache. The array and its metadata are
written under temporary names and renamed into place, and a file lock lets one process build while
the others (other runs, other ranks) wait and then reuse it.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from twinview.pretrain.data.builtin import cache_dir
from twinview.pretrain.data.decode import BadImage, decode_image
from twinview.pretrain.data.index import CACHE_VERSION, FolderIndex, cache_key
from twinview.pretrain.data.pk_sampler import PKBatchSampler
from twinview.pretrain.distributed import to_device_async


@dataclass
class DecodedCache:
    """A built cache: ``images[kept[i]]`` is item i, with label ``labels[i]``.

    Attributes:
        images: ``(N_files, S, S, 3)`` uint8 memory map (rows of bad files are zero).
        index: The usable items: their files, labels and classes.
        kept: Row of each usable item in ``images``.
        skipped: Files that could not be decoded, with the reason.
        path: The ``.npy`` file.
    """

    images: np.ndarray
    index: FolderIndex
    kept: np.ndarray
    skipped: dict[str, str]
    path: Path


def _decode(args: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str]:
    i, path, size = args
    try:
        return i, decode_image(path, size), ""
    except BadImage as err:
        return i, None, str(err)


def build_or_load(
    index: FolderIndex, size: int, workers: int = 0, strict: bool = False, root: Path | None = None
) -> DecodedCache:
    """Returns the cache of ``index`` at ``size``, building it first when it does not exist.

    Args:
        index: The files (and labels) to cache.
        size: Side of the square images.
        workers: Decoding processes for the build (0: one per CPU).
        strict: Fail on the first bad file instead of leaving it out.
        root: Cache folder (default ``CACHE/decoded``).

    Raises:
        BadImage: With ``strict`` and a file that cannot be decoded.
    """
    folder = Path(root or cache_dir() / "decoded")
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(index, size)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find it built
        if not (meta.is_file() and npy.is_file()):
            _build(index, size, workers, strict, npy, meta)
    info = json.loads(meta.read_text())
    if strict and info["skipped"]:
        first = next(iter(info["skipped"].items()))
        raise BadImage(f"{first[0]}: {first[1]} (data.strict=true; the cache lists {len(info['skipped'])} bad files)")
    kept = np.asarray(info["kept"], dtype=np.int64)
    usable = FolderIndex(
        root=index.root,
        files=tuple(index.files[k] for k in kept),
        labels=tuple(index.labels[k] for k in kept),
        classes=index.classes,
    )
    return DecodedCache(np.load(npy, mmap_mode="r"), usable, kept, info["skipped"], npy)


def _build(index: FolderIndex, size: int, workers: int, strict: bool, npy: Path, meta: Path) -> None:
    n = len(index.files)
    tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    skipped: dict[str, str] = {}
    jobs = [(i, str(f), size) for i, f in enumerate(index.files)]
    processes = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
    try:
        results = pool.imap_unordered(_decode, jobs, chunksize=256) if pool else map(_decode, jobs)
        for i, array, reason in results:
            if array is None:
                if strict:
                    tmp.unlink(missing_ok=True)
                    raise BadImage(f"{index.files[i]}: {reason} (data.strict=true)")
                skipped[str(index.files[i])] = reason
            else:
                images[i] = array
    finally:
        if pool is not None:
            pool.terminate()
    images.flush()
    del images
    os.replace(tmp, npy)
    kept = [i for i, f in enumerate(index.files) if str(f) not in skipped]
    tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps({"version": CACHE_VERSION, "size": size, "kept": kept, "skipped": skipped}))
    os.replace(tmp_meta, meta)  # the metadata's presence marks a complete cache


class CachedDataset(Dataset):
    """``(uint8 (3,S,S) tensor, label)`` items read from a decoded cache (``data.cache=disk``)."""

    def __init__(self, cache: DecodedCache) -> None:
        self.cache, self.index = cache, cache.index

    def __len__(self) -> int:
        return len(self.cache.kept)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = np.array(self.cache.images[self.cache.kept[i]])  # (S, S, 3), a writable copy of the mapped row
        return torch.from_numpy(row).permute(2, 0, 1), self.index.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one read (the DataLoader calls this instead of per-item ``__getitem__``).

        Returns ``(B, 3, S, S)`` uint8 in channels-last memory (no transposing copy) and ``(B,)`` labels;
        pair it with :func:`batched_collate`.
        """
        rows = self.cache.kept[np.asarray(indices)]
        images = torch.from_numpy(self.cache.images[rows])  # (B, S, S, 3): one fancy-index copy, batch order
        labels = torch.tensor([self.index.labels[i] for i in indices], dtype=torch.long)
        return images.permute(0, 3, 1, 2), labels


def batched_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate function for :meth:`CachedDataset.__getitems__`: the batch is already made."""
    return batch


class DeviceBatches:
    """Batches indexed from a cache held on the training device (``data.cache=device``).

    Each epoch draws a permutation (from ``seed`` and the epoch, the same on every process); each
    process takes every ``world``-th item of it and cuts full batches. With a ``batch_sampler``
    (the P x K sampler, seeded alike on every process) its batches are dealt round-robin. On a CPU
    the image batches live in two reused buffers: a batch is valid until the next-but-one batch is
    drawn.
    """

    def __init__(
        self,
        cache: DecodedCache,
        device: torch.device,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        batch_sampler: PKBatchSampler | None = None,
    ) -> None:
        rows = torch.from_numpy(np.ascontiguousarray(cache.images[cache.kept]))  # (N, S, S, 3)
        self.images = rows.permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, S, S) uint8
        self.labels = torch.tensor(cache.index.labels, dtype=torch.long, device=device)
        self.device, self.batch_size, self.seed, self.rank, self.world = device, batch_size, seed, rank, world
        self.batch_sampler, self.epoch = batch_sampler, 0
        self.index = cache.index

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler) // self.world
        return (len(self.labels) // self.world) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batch_sampler is not None:  # the same sampler on every process: deal its batches round-robin
            dealt = (b for i, b in enumerate(self.batch_sampler) if i % self.world == self.rank)
            batches: Iterator[torch.Tensor] = (torch.tensor(b) for b in itertools.islice(dealt, len(self)))
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            mine = torch.randperm(len(self.labels), generator=g)[self.rank :: self.world]
            batches = (mine[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self)))
        # On a CPU every fresh batch-sized allocation is paid in page faults (for a 224 px batch of
        # 256, several times the copy itself: docs/BENCHMARKS.md), so batches are gathered into
        # two buffers used in turn. A batch stays valid until the next-but-one is drawn, which is
        # all a training step needs; copy it to keep it longer. Accelerators allocate from a cache.
        reuse = self.device.type == "cpu"
        buffers: list[torch.Tensor] = []
        for b, idx in enumerate(batches):
            idx = to_device_async(idx, self.device)
            if not reuse:
                yield self.images[idx], self.labels[idx]
                continue
            if len(buffers) < 2:
                buffers.append(torch.empty((self.batch_size, *self.images.shape[1:]), dtype=self.images.dtype))
            out = buffers[b % 2][: len(idx)]
            torch.index_select(self.images, 0, idx, out=out)
            yield out, self.labels[idx]
