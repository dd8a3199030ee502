"""Weighted cosine k-nearest-neighbour classification of frozen features.

The classifier of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"), the standard kNN monitor of SSL papers: each of the k most cosine-similar training
samples votes for its class with weight ``exp(s / T)``; classes are ranked by total vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITY_BUDGET = 1 << 28  # float32 similarities per block: 1 GiB


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Class scores of every test sample: ``score[c] = sum_{j in kNN, y_j = c} exp(cos(x, x_j) / T)``.

    Args:
        train_features: ``(N, D)`` features of the labelled reference set.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` features to classify.
        num_classes: Number of classes C.
        k: Neighbours per query (capped at N).
        temperature: T of the vote weights.
        chunk_size: Queries per block, so memory stays ``chunk_size x N``; 0 picks it so that a
            block holds at most ``SIMILARITY_BUDGET`` similarities and at most 4,096 queries.

    Returns:
        ``(M, C)`` float32 scores.
    """
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    labels = train_labels.to(train.device).long()
    k = min(k, train.shape[0])
    chunk_size = chunk_size or max(1, min(4096, SIMILARITY_BUDGET // max(train.shape[0], 1)))
    out = []
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)  # (m, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (m, k)
        weights = (sim / temperature).exp()  # (m, k)
        scores = torch.zeros(query.shape[0], num_classes, device=train.device)  # (m, C)
        scores.scatter_add_(1, labels[idx], weights)
        out.append(scores)
    return torch.cat(out)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier.

    Args:
        train_features: ``(N, D)`` reference features.
        train_labels: ``(N,)`` reference labels.
        test_features: ``(M, D)`` query features.
        test_labels: ``(M,)`` query labels.
        k: Neighbours per query.
        temperature: Vote temperature.

    Returns:
        ``{"top1": ..., "top5": ...}`` as fractions in [0, 1] (top-5 equals 1 with <= 5 classes).
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    ranked = scores.argsort(dim=1, descending=True)[:, : min(5, num_classes)]  # (M, <=5)
    hits = ranked == test_labels.to(ranked.device).view(-1, 1)
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item()}
