"""Fine-tune a twinview export on a labelled image folder with plain timm + torch (no twinview).

    python examples/finetune.py --weights EXPORT_DIR --data DIR [--epochs 5] [--lr 1e-3]

DIR holds one sub-folder per class. The backbone comes from ``timm.create_model("local-dir:...")``
with a fresh classifier; its input size and normalisation come from the export's timm data config.
Prints one JSON line per epoch (loss and accuracy on a held-out 20%).
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision.datasets import ImageFolder


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="folder written by `twinview export`")
    parser.add_argument("--data", required=True, help="image folder with one sub-folder per class")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    full = ImageFolder(args.data)
    model = timm.create_model(f"local-dir:{args.weights}", pretrained=True, num_classes=len(full.classes))
    config = resolve_data_config({}, model=model)  # input size, mean, std of the export
    train_tf = create_transform(**config, is_training=True, hflip=0.5, auto_augment=None, re_prob=0.0)
    eval_tf = create_transform(**config, is_training=False)
    n_val = max(1, len(full) // 5)
    train_idx, val_idx = random_split(
        range(len(full)), [len(full) - n_val, n_val], torch.Generator().manual_seed(args.seed)
    )
    train_set = torch.utils.data.Subset(ImageFolder(args.data, transform=train_tf), list(train_idx))
    val_set = torch.utils.data.Subset(ImageFolder(args.data, transform=eval_tf), list(val_idx))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=args.batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    result: dict[str, float] = {}
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for images, targets in train_loader:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, targets in val_loader:
                correct += (model(images).argmax(1) == targets).sum().item()
        result = {"epoch": epoch + 1, "train_loss": total / len(train_set), "val_accuracy": correct / len(val_set)}
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
