"""Frozen-backbone feature extraction, batched on the device, sharded over processes when launched
with several (``accelerate launch``): each process extracts its share and ``gather_for_metrics``
puts every feature back, in dataset order, on every process."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twinview.augment.views import Normalize
from twinview.pretrain.data.sources import worker_init


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
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
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=worker_init if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    sharded = accelerator is not None and accelerator.num_processes > 1
    if sharded:
        loader = accelerator.prepare_data_loader(loader)  # type: ignore[union-attr]
    feats, labels = [], []
    for images, targets in loader:
        x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        f, t = backbone(x).float(), torch.as_tensor(targets, device=x.device)
        if sharded:
            f, t = accelerator.gather_for_metrics((f, t))  # type: ignore[union-attr]
        feats.append(f.cpu())
        labels.append(t.cpu())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()
