"""The batches a run trains on: uint8 images and labels, per process, epoch after epoch.

Three ways, chosen by ``data.path`` and ``data.cache``: a DataLoader whose workers decode the
files (or read the disk cache, or a Hugging Face data set), sharded across processes by
Accelerate; batches cut on the device from the decoded cache (``data.cache=device``, no workers);
or a stream of fixed-length epochs (``data.streaming=true``, and WebDataset tar shards, which are
always streamed: :mod:`twinview.pretrain.data.shards`). The supervised objectives get P x K
class-balanced batches in each of the first two. With ``data.decode=gpu`` the workers send JPEG
bytes and the batches are decoded on the device (:mod:`twinview.pretrain.data.gpu_decode`). The
source comes resolved (:mod:`twinview.pretrain.data.source`) and already checked against the config.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from twinview.pretrain.config import Config
from twinview.pretrain.data.cache import CachedDataset, DeviceBatches, batched_collate, build_or_load
from twinview.pretrain.data.folder import ImageFolderDataset, SkipLog, worker_init
from twinview.pretrain.data.gpu_decode import DeviceDecoder, EncodedImageFolder, encoded_collate
from twinview.pretrain.data.pk_sampler import PKBatchSampler
from twinview.pretrain.data.source import SHARDS, Source
from twinview.pretrain.objectives.registry import get as get_objective

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, 3, S, S) and labels (B,), on the device
_OPEN: weakref.WeakSet[Batches] = weakref.WeakSet()  # closed at exit, see Batches.close


@atexit.register  # registered after multiprocessing's exit handler (torch imported it), so it runs first
def _close_open_batches() -> None:
    for batches in list(_OPEN):
        batches.close()


class Batches:
    """The batches of every epoch: ``set_epoch(e)``, then iterate; ``len()`` batches per process.

    Built by :func:`build_batches`; a DataLoader is sharded across processes only by
    :meth:`prepare` (after the model, so the weights are drawn from the same random stream
    whatever the data).
    """

    def __init__(
        self, source: Any, sampler: PKBatchSampler | None = None, decoder: DeviceDecoder | None = None
    ) -> None:
        self.source, self.sampler, self.decoder = source, sampler, decoder
        _OPEN.add(self)

    def close(self) -> None:
        """Stops the DataLoader's worker processes now.

        The workers ignore SIGTERM (:func:`~twinview.pretrain.data.folder.worker_init`: a launcher
        signals the whole process group, and the loop must checkpoint first), so a loader still alive
        when the interpreter exits (an endless stream's iterator, or one held by an uncaught error's
        traceback) would keep multiprocessing's exit handler waiting for them forever. torch has no
        public call for this: ``_shutdown_workers`` is what its iterators run when freed.
        """
        loader = self.source.loader if isinstance(self.source, _StreamBatches) else self.source
        iterators = (getattr(self.source, "_it", None), getattr(loader, "_iterator", None))
        for it in iterators:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        """Used as ``with batches:``, the workers stop however the loop ends (see :meth:`close`)."""
        self.close()

    def prepare(self, accelerator: Accelerator) -> Batches:
        """Shards a DataLoader across processes (the device cache and streams shard themselves)."""
        if isinstance(self.source, DataLoader):  # JPEG bytes for the device decoder stay on the CPU
            self.source = accelerator.prepare_data_loader(self.source, device_placement=self.decoder is None)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Batch]:
        if self.decoder is None:
            return iter(self.source)
        return self._decoded()

    def _decoded(self) -> Iterator[Batch]:
        assert self.decoder is not None
        for batch in self.source:
            yield self.decoder(batch)


def build_batches(cfg: Config, source: Source, accelerator: Accelerator, skip_log: SkipLog) -> Batches:
    """The run's batches from its resolved source (checked against the config by the caller,
    ``twinview.pretrain.validate.validate_data``): decoded every epoch, from the disk cache, from the
    device cache, or streamed."""
    d = cfg.data
    pin = accelerator.device.type == "cuda"
    rank, world = accelerator.process_index, accelerator.num_processes
    if source.streamed:
        from twinview.pretrain.data.hf import streamed
        from twinview.pretrain.data.shards import shard_stream

        make_stream = shard_stream if source.kind == SHARDS else streamed
        stream = make_stream(source, d.size, rank, world, cfg.train.seed, skip_log)
        loader = DataLoader(
            stream,
            batch_size=cfg.train.batch_size,
            num_workers=d.num_workers,
            worker_init_fn=worker_init if d.num_workers else None,
            pin_memory=pin,
        )
        passes = cfg.train.max_steps_per_epoch * cfg.train.grad_accumulation  # batches per epoch
        return Batches(_StreamBatches(loader, stream, accelerator.device, passes))
    if source.read_by_datasets:
        from twinview.pretrain.data.hf import HFImageDataset

        dataset: Any = HFImageDataset(source, d.size, strict=d.strict, skip_log=skip_log)
    elif d.decode == "gpu":
        folder = ImageFolderDataset(source.files, d.size, strict=d.strict, skip_log=skip_log)
        dataset = EncodedImageFolder(folder)
        sampler = _sampler(cfg, dataset.index.labels)
        return Batches(_loader(cfg, dataset, sampler, pin), sampler, DeviceDecoder(folder, accelerator.device))
    elif d.cache == "none":
        dataset = ImageFolderDataset(source.files, d.size, strict=d.strict, skip_log=skip_log)
    else:
        # the cache's file lock makes one process build while the others wait (no collective
        # barrier, which would time out on a long build under NCCL)
        cache = build_or_load(source.files, d.size, workers=d.num_workers, strict=d.strict)
        for path, reason in cache.skipped.items():
            skip_log.record(Path(path), reason)
        accelerator.print(f"Decoded cache: {cache.path} ({len(cache.kept)} images, {len(cache.skipped)} skipped)")
        dataset = CachedDataset(cache)
    sampler = _sampler(cfg, dataset.index.labels)
    if d.cache == "device":  # the same sampler on every process; its batches are dealt round-robin
        return Batches(
            DeviceBatches(dataset.cache, accelerator.device, cfg.train.batch_size, cfg.train.seed, rank, world, sampler)
        )
    return Batches(_loader(cfg, dataset, sampler, pin), sampler)


def _sampler(cfg: Config, labels: Sequence[int]) -> PKBatchSampler | None:
    """The P x K sampler of the supervised objectives (None for the others)."""
    if not get_objective(cfg.objective.name).supervised:
        return None
    k = cfg.data.samples_per_class
    return PKBatchSampler(labels, cfg.train.batch_size // k, k, seed=cfg.train.seed)


def _loader(cfg: Config, dataset: Any, sampler: PKBatchSampler | None, pin: bool) -> DataLoader:
    """Random batches, or the sampler's P x K batches, decoded in worker processes."""
    workers = cfg.data.num_workers
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
        "worker_init_fn": worker_init if workers > 0 else None,
    }
    if isinstance(dataset, CachedDataset):
        common["collate_fn"] = batched_collate  # the cache reads whole batches (__getitems__)
    if isinstance(dataset, EncodedImageFolder):
        common["collate_fn"] = encoded_collate  # payloads differ in length: packed into one tensor
    if sampler is not None:
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, **common)


class _StreamBatches:
    """Fixed-length epochs over a streamed source: ``steps`` batches per epoch, moved to the device."""

    def __init__(self, loader: DataLoader, stream: Any, device: torch.device, steps: int) -> None:
        self.loader, self.stream, self.device, self.steps = loader, stream, device, steps
        self._it: Any = None

    def set_epoch(self, epoch: int) -> None:
        if self._it is None:
            self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        if self._it is None:
            self._it = iter(self.loader)  # one endless stream across epochs
        for _ in range(self.steps):
            try:
                images, labels = next(self._it)
            except StopIteration:
                raise ValueError("the streamed data set produced no decodable images") from None
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
