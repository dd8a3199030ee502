"""A training objective defined outside twinview: Decoupled Contrastive Learning (DCL).

Yeh et al. 2022, "Decoupled Contrastive Learning" (arXiv:2110.06848): NT-Xent without the positive
pair in the denominator, ``l_i = -s_{i,p(i)} + log sum_{k != i, p(i)} exp(s_ik)``. One registry
entry (config section, method class, paper) is all it takes; docs/ARCHITECTURE.md walks through it.

Use it from a script of your own (the module must be imported before the config is read):

    import dcl_objective  # registers "dcl"
    from twinview.pretrain.config import load_config
    from twinview.pretrain.engine.train import train
    cfg = load_config("simclr-cifar10", ["data.path=/my/images", "objective.name=dcl"])
    train(cfg, Path("runs/dcl"))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twinview.pretrain.objectives import registry
from twinview.pretrain.objectives.methods import Method, Tensors


def dcl(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The DCL loss of two views' ``(N, D)`` embeddings, on one process (no cross-process negatives)."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D)
    n = z_a.shape[0]
    s = z @ z.T / temperature  # (2N, 2N)
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2N,)
    rows = torch.arange(2 * n, device=z.device)
    pos = s[rows, positive]  # (2N,)
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    s[rows, positive] = float("-inf")  # decoupled: the positive leaves the denominator
    return (torch.logsumexp(s, dim=1) - pos).mean()


@dataclass
class DCLConfig:
    """``objective.dcl``: Attributes: temperature: Softmax temperature."""

    temperature: float = 0.1


class DCL(Method):
    """Both views through backbone + head, then :func:`dcl`; no keys, no state."""

    def __init__(self, section: DCLConfig, online: torch.nn.Module, seed: int) -> None:
        super().__init__()
        self.temperature = section.temperature

    def loss(self, outputs: Tensors, keys: Tensors, labels: torch.Tensor) -> torch.Tensor:
        z_a, z_b = outputs  # (N, D) each
        return dcl(z_a, z_b, self.temperature)


registry.register(
    registry.Objective(
        "dcl",
        f"{__name__}:DCL",
        DCLConfig,
        "NT-Xent without the positive in the denominator",
        "Yeh et al. 2022, Decoupled Contrastive Learning (arXiv:2110.06848)",
    )
)
