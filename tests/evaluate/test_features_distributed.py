"""Feature extraction over 2 CPU processes (gloo, Accelerate) equals one process, in dataset order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out


def _worker(rank: int, folder: str, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from accelerate import Accelerator

    from twinview.evaluate.features import extract_features
    from twinview.pretrain.data.folder import ImageFolderDataset
    from twinview.pretrain.data.source import scan_source

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    dataset = ImageFolderDataset(scan_source(folder), 16)  # 24 images, batches of 5: uneven shards, padding
    feats, labels = extract_features(
        net, dataset, (0.5,) * 3, (0.5,) * 3, batch_size=5, num_workers=0, accelerator=accelerator
    )
    torch.save((feats, labels), f"{out}.{rank}")
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_processes_gather_every_feature_once_in_order(image_folder: Path, tmp_path: Path) -> None:
    from twinview.evaluate.features import extract_features
    from twinview.pretrain.data.folder import ImageFolderDataset
    from twinview.pretrain.data.source import scan_source

    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(str(image_folder), port, str(tmp_path / "out")), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    expected, expected_labels = extract_features(
        net, ImageFolderDataset(scan_source(image_folder), 16), (0.5,) * 3, (0.5,) * 3, batch_size=5, num_workers=0
    )
    for rank in range(2):
        feats, labels = torch.load(tmp_path / f"out.{rank}")
        assert feats.shape == expected.shape == (24, 4)
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(labels, expected_labels)
