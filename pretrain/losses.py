"""Contrastive losses: pure functions of embeddings, ``(z_a, z_b) -> scalar``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al., ICML 2020).

    With ``z`` the 2N L2-normalised embeddings of both views and ``s_ij = z_i . z_j / t``, each
    sample i has exactly one positive p(i) (the other view of the same image) and 2N - 2 negatives:

        l_i = -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) ),    L = 1/(2N) sum_i l_i

    Args:
        z_a: ``(N, D)`` embeddings of the first views.
        z_b: ``(N, D)`` embeddings of the second views; row i is the positive of ``z_a`` row i.
        temperature: t > 0.

    Returns:
        The scalar mean loss over all 2N anchors (computed in float32).
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    logits.fill_diagonal_(float("-inf"))  # an anchor is never its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2N,) index of p(i)
    return F.cross_entropy(logits, targets)
