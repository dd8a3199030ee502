"""A training objective defined outside twinview: Decoupled Contrastive Learning (DCL).

Yeh et al. 2022, "Decoupled Contrastive Learning" (arXiv:2110.06848): NT-Xent without the positive
pair in the denominator, ``l_i = -s_{i,p(i)} + log sum_{k != i, p(i)} exp(s_ik)``. One registry
entry (config section, method class, paper) is all it takes; docs/ARCHITECTURE.md walks through it.

From the command line, as a plugin (saved in the run's config.yaml, so that --resume, evaluate,
embed and export load it again):

    twinview pretrain --plugin examples/dcl_objective.py --config simclr-cifar10 objective.name=dcl data.path=/my/images

or installed with an entry point in your package's metadata, after which ``objective.name=dcl``
just works: ``[project.entry-points."twinview.objectives"] dcl = "dcl_objective"``.

From a script of your own (the module must be imported before the config is read):

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

from twinview.pretrain import distributed
from twinview.pretrain.objectives import registry
from twinview.pretrain.objectives.methods import Method, Tensors


def dcl(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The DCL loss of two views' ``(N, D)`` embeddings, with negatives from every process.

    As :func:`twinview.pretrain.objectives.losses.nt_xent` does: the normalised embeddings of all
    processes are gathered with their gradient (2M candidates) and this process's 2N anchors are
    scored against them, each anchor's own column and its positive's column out of the denominator:
    ``l_i = -s_{i,p(i)} + logsumexp_{k != i, p(i)} s_ik``, the mean over this process's 2N anchors.
    """
    n = z_a.shape[0]
    a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)  # (N, D)
    a_all, b_all = distributed.gather_with_grad(a), distributed.gather_with_grad(b)  # (M, D)
    m, offset = a_all.shape[0], distributed.rank() * n
    s = torch.cat([a, b]) @ torch.cat([a_all, b_all]).T / temperature  # (2N, 2M)
    local = torch.arange(n, device=a.device) + offset  # this process's rows among the M
    rows = torch.arange(2 * n, device=a.device)
    self_index = torch.cat([local, local + m])  # (2N,) each anchor's own column
    positive = torch.cat([local + m, local])  # (2N,) the other view
    pos = s[rows, positive]  # (2N,)
    s[rows, self_index] = float("-inf")  # never its own negative
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
