"""Linear probe: a linear classifier trained on frozen, cached features.

The features are standardised with the training set's statistics; a linear layer is trained with
AdamW and a per-step cosine schedule for each weight decay of a small grid, scored on a validation
split carved (stratified) from the training features; the best weight decay is retrained on all
training features and scored on the test features (top-1/top-5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from twinview.evaluate.results import ProbeResult

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def _stratified_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a (train, validation) split with ``fraction`` of every class in validation."""
    train_idx, val_idx = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(fraction * len(members)) if len(members) > 1 else 0
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return torch.cat(train_idx), torch.cat(val_idx)


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    weight_decay: float,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> nn.Linear:
    model = nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return model


@torch.no_grad()
def _topk(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == y).float().mean().item(), (top == y[:, None]).any(dim=1).float().mean().item()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 50,
    lr: float = 1e-2,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    seed: int = 0,
) -> ProbeResult:
    """Trains and scores the probe.

    Args:
        train_x: ``(N, D)`` frozen training features; train_y: ``(N,)`` labels in ``[0, C)``.
        test_x: ``(M, D)`` test features; test_y: ``(M,)`` labels.
        epochs: Passes over the features per fit.
        lr: Peak AdamW learning rate.
        batch_size: Features per step.
        val_fraction: Share of each class held out to choose the weight decay.
        weight_decays: The grid.
        seed: For the split and the shuffling.

    Returns:
        Top-1 and top-5 on the test features, the chosen weight decay and the validation top-1 of each.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    tr, va = _stratified_split(train_y, val_fraction, g)
    val_top1 = {}
    for wd in weight_decays:
        torch.manual_seed(seed)
        model = _fit(xs[tr], train_y[tr], classes, wd, epochs, lr, batch_size, g)
        val_top1[wd] = _topk(model, xs[va], train_y[va])[0] if len(va) else 0.0
    best = max(weight_decays, key=lambda wd: (val_top1[wd], -wd))
    torch.manual_seed(seed)
    model = _fit(xs, train_y, classes, best, epochs, lr, batch_size, g)
    top1, top5 = _topk(model, xt, test_y)
    return ProbeResult(top1, top5, best, {str(k): v for k, v in val_top1.items()}, epochs)
