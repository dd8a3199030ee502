"""Frozen-backbone feature extraction, batched on the device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twinview.augment.views import Normalize
from twinview.pretrain.data import worker_init


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
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
    feats, labels = [], []
    for images, targets in loader:
        x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x).float().cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()
