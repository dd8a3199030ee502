"""Retrieval, verification and representation-diagnostic metrics on embeddings (pure functions).

Shapes: ``Q`` queries, ``G`` gallery items, ``N`` embeddings, ``D`` width. Similarities are cosine
(embeddings are L2-normalised here); the gallery is scored in chunks of queries, so memory is
``chunk x G``, never ``Q x G x D``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import auc, roc_curve

CHUNK = 1024


def _ranked_matches(
    queries: torch.Tensor,
    q_labels: torch.Tensor,
    gallery: torch.Tensor,
    g_labels: torch.Tensor,
    exclude_self: bool,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query: whether each of its top-k gallery items has its label, and its positives count."""
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    hits, totals = [], []
    for start in range(0, len(q), CHUNK):
        sim = q[start : start + CHUNK] @ g.T  # (chunk, G)
        same = q_labels[start : start + CHUNK, None] == g_labels[None, :]
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = float("-inf")
            same[rows, rows + start] = False
        order = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (chunk, k) best first
        hits.append(same.gather(1, order))
        totals.append(same.sum(dim=1))
    return torch.cat(hits), torch.cat(totals)


def retrieval_metrics(
    queries: torch.Tensor,
    q_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    g_labels: torch.Tensor | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K, precision@1 and MAP@R (Musgrave, Belongie, Lim 2020, "A Metric Learning Reality Check").

    Recall@K: the share of queries with at least one same-label item among their K nearest gallery
    items. MAP@R: with R the number of same-label gallery items of a query,
    ``1/R * sum_{i<=R} P(i) * rel(i)`` over its top R, averaged over queries with R > 0. Without a
    separate gallery, the queries are the gallery (leave-one-out: a query never retrieves itself).
    """
    exclude_self = gallery is None
    gallery = queries if gallery is None else gallery
    g_labels = q_labels if g_labels is None else g_labels
    r_max = int(torch.bincount(g_labels - g_labels.min()).max())
    hits, totals = _ranked_matches(queries, q_labels, gallery, g_labels, exclude_self, max(max(ks), r_max))
    out = {f"recall@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}
    out["precision@1"] = hits[:, 0].float().mean().item()
    ranks = torch.arange(1, hits.shape[1] + 1)
    precision_at_i = hits.float().cumsum(dim=1) / ranks
    within_r = ranks[None, :] <= totals[:, None]
    ap = (precision_at_i * hits * within_r).sum(dim=1) / totals.clamp_min(1)
    valid = totals > 0
    out["map@r"] = ap[valid].mean().item() if valid.any() else 0.0
    return out


def verification_metrics(scores: torch.Tensor, same: torch.Tensor, far: float = 1e-3) -> dict[str, float]:
    """ROC AUC, equal error rate and TAR at a given FAR for pair scores (higher = more alike).

    Args:
        scores: ``(P,)`` similarity of each pair.
        same: ``(P,)`` bool, True for a genuine (same-identity) pair.
        far: The false accept rate at which to report the true accept rate.

    Returns:
        ``roc_auc`` (from scikit-learn's ROC curve over every threshold), ``eer`` (the mean of FAR
        and FRR at the threshold where they are closest) and ``tar@far=<far>`` (the highest true
        accept rate at a false accept rate <= ``far``).

    Raises:
        ValueError: Without both genuine and impostor pairs.
    """
    scores, same = scores.double().cpu(), same.bool().cpu()
    if bool(same.all()) or not bool(same.any()):
        raise ValueError("verification needs both genuine and impostor pairs.")
    # every threshold (drop_intermediate=False), so no ROC point near the EER or the FAR is lost;
    # the trapezoids count a tie between a genuine and an impostor pair as half
    fars, tar, _ = roc_curve(same.numpy(), scores.numpy(), drop_intermediate=False)
    frr = 1 - tar
    i = int(np.abs(fars - frr).argmin())
    eer = float((fars[i] + frr[i]) / 2)
    ok = fars <= far
    return {"roc_auc": float(auc(fars, tar)), "eer": eer, f"tar@far={far:g}": float(tar[ok].max()) if ok.any() else 0.0}


def alignment(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola 2020: ``E ||f(x) - f(x+)||^alpha`` over positive pairs (normalised; lower is better)."""
    a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    return (a - b).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola 2020: ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs (lower is better)."""
    x = F.normalize(z.float(), dim=1)
    d2 = torch.pdist(x).pow(2)
    return torch.logsumexp(-t * d2, dim=0).item() - math.log(len(d2))


def effective_rank(z: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): ``exp(entropy(sigma / ||sigma||_1))`` of the singular values."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_warning(z: torch.Tensor, threshold: float = 0.01) -> str | None:
    """A message when the embeddings look collapsed: effective rank below 2 or ``threshold`` of the width."""
    rank = effective_rank(z)
    if rank < max(2.0, threshold * min(z.shape)):
        return (
            f"the representation looks collapsed: effective rank {rank:.2f} of {min(z.shape)} dimensions "
            "(every image maps to nearly the same embedding)"
        )
    return None
