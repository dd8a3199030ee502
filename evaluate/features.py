"""Frozen-backbone feature extraction, batched on the device, sharded over processes when launched
with several (``accelerate launch``): each process extracts its share and ``gather_for_metrics``
puts every feature back, in dataset order, on every process. :class:`Embedder` holds a backbone
with its normalisation and extraction settings, and adds an optional on-disk cache keyed by the
data set's fingerprint and the backbone's weights."""

from __future__ import annotations

import dataclasses
import hashlib
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twinview.augment.views import Normalize
from twinview.evaluate.dataset import LabelledImages


def quiet_worker(_: int) -> None:
    """DataLoader ``worker_init_fn``: one thread per decoding worker, and deaf to the stop signals
    (SIGTERM, SIGINT, SLURM's SIGUSR1: launchers and Ctrl-C signal the whole process group; the
    DataLoader stops its workers itself)."""
    torch.set_num_threads(1)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def state_checksum(module: nn.Module) -> float:
    """A float summary of every parameter and buffer, to show a backbone was not changed."""
    with torch.no_grad():
        return float(
            sum(
                t.double().sum() + t.double().abs().sum() for t in module.state_dict().values() if t.is_floating_point()
            )
        )


@torch.no_grad()
def frozen_forward(
    backbone: nn.Module, normalize: Normalize, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Features of one batch as every command computes them (evaluation, ``twinview embed``, search).

    Args:
        backbone: In eval mode, on ``device``.
        normalize: The backbone's normalisation, on ``device``.
        images: ``(B, 3, S, S)`` uint8 images.
        device: Where to run.

    Returns:
        ``(B, D)`` float32 features on ``device``.
    """
    x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
    return backbone(x).float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset[Any] | LabelledImages,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    accelerator: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the frozen backbone (eval mode) over a dataset of ``(uint8 image, label)`` pairs.

    Args:
        backbone: Maps ``(B, 3, H, W)`` normalised images to ``(B, D)`` features.
        dataset: Yields uint8 ``(3, S, S)`` images and integer labels.
        mean: Normalisation mean of the backbone.
        std: Normalisation std of the backbone.
        batch_size: Images per forward pass.
        num_workers: Decoding workers.
        device: Where to run the backbone.
        accelerator: An ``accelerate.Accelerator`` of several processes: the data set is split
            among them and the features gathered (duplicates from padding dropped).

    Returns:
        ``(N, D)`` float32 features on the CPU and ``(N,)`` int64 labels, in dataset order.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval().to(device)
    normalize = Normalize(mean, std).to(device)
    loader: DataLoader[Any] = DataLoader(
        cast("Dataset[Any]", dataset),  # any sized, indexable data set loads as a map-style one
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=quiet_worker if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    sharded = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
    if sharded is not None:
        loader = sharded.prepare_data_loader(loader)
    feats, labels = [], []
    for images, targets in loader:
        f = frozen_forward(backbone, normalize, images, device)
        t = torch.as_tensor(targets, device=f.device)
        if sharded is not None:
            f, t = sharded.gather_for_metrics((f, t))
        feats.append(f.cpu())
        labels.append(t.cpu())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def cache_file(folder: Path, dataset: LabelledImages, weights_checksum: float) -> Path:
    """Where the features of ``dataset`` under weights ``weights_checksum`` are cached in ``folder``.

    The name is the data set's folder name and a hash of its fingerprint (files, sizes, mtimes,
    labels, image size) and the weights: a changed data set or backbone gets a new file.
    """
    key = hashlib.sha256(f"{dataset.fingerprint()}:{weights_checksum!r}".encode()).hexdigest()[:16]
    return Path(folder) / f"{Path(dataset.index.root).name}-{key}.pt"


def save_features(path: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Writes features and labels atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": features, "labels": labels}, tmp)
    tmp.replace(path)


def load_features(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads what :func:`save_features` wrote."""
    cached = torch.load(path)
    return cached["features"], cached["labels"]


@dataclass(frozen=True)
class Embedder:
    """A frozen backbone and how images reach it: what every command that embeds images shares
    (the labelled and label-free evaluations, ``twinview embed`` and ``search``, the online monitor).

    Attributes:
        backbone: The frozen backbone (its weights are never changed).
        mean: Its normalisation mean.
        std: Its normalisation std.
        batch_size: Images per forward pass.
        num_workers: Decoding workers.
        device: Where to run the backbone.
        accelerator: Several processes (``accelerate launch``) split the work (see
            :func:`extract_features`); None for one process.
    """

    backbone: nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 512
    num_workers: int = 2
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any | None = None

    def weights(self) -> float:
        """:func:`state_checksum` of the backbone: which weights made an embedding."""
        return state_checksum(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` float32 features of ``(B, 3, S, S)`` uint8 images, on the device (eval mode)."""
        self.backbone.eval().to(self.device)
        return frozen_forward(self.backbone, Normalize(self.mean, self.std).to(self.device), images, self.device)

    def features(self, dataset: LabelledImages, cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)`` features and ``(N,)`` labels of ``dataset``, in order, on the CPU.

        Args:
            dataset: The images.
            cache_dir: Cache the features there, keyed by the data set's fingerprint and the
                weights, and read them from there when present (None: no cache).
        """
        if cache_dir is None:
            return self._extract(dataset)
        path = cache_file(cache_dir, dataset, self.weights())
        if path.is_file():
            return load_features(path)
        features, labels = self._extract(dataset)
        save_features(path, features, labels)
        return features, labels

    def _extract(self, dataset: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            self.backbone,
            dataset,
            self.mean,
            self.std,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            accelerator=self.accelerator,
        )
