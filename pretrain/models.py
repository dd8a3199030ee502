"""Backbone + projection head, composed (no method class hierarchy).

The backbone is any ``timm`` model created with ``num_classes=0`` so it returns pooled features and
its state dict keeps timm's key names (what export writes and ``timm.create_model`` loads).
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from twinview.pretrain.config import Config, ModelConfig, objective_section
from twinview.pretrain.objectives import registry


def apply_cifar_stem(backbone: nn.Module) -> nn.Module:
    """Replaces a ResNet's stem with the CIFAR one: 3x3 stride-1 first conv and no max-pool.

    The 7x7 stride-2 conv + max-pool of ImageNet ResNets shrinks a 32x32 image to 8x8 before the
    first block; the CIFAR stem (He et al. 2016, Sec. 4.2) keeps 32x32. In place.

    Args:
        backbone: A timm ResNet-family model with ``conv1`` (a Conv2d) and ``maxpool``.

    Returns:
        The same module.

    Raises:
        ValueError: If the model has no plain ``conv1``/``maxpool`` stem.
    """
    conv1 = getattr(backbone, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(backbone, "maxpool"):
        raise ValueError(
            f"model.cifar_stem needs a ResNet with a single-conv stem (conv1 + maxpool); "
            f"{type(backbone).__name__} has none. Use e.g. resnet18/resnet34/resnet50."
        )
    backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    return backbone


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """Creates the timm backbone (random init, pooled features) and applies the CIFAR stem if asked.

    Args:
        cfg: The model section of the config.

    Returns:
        A module mapping ``(B, 3, H, W)`` to ``(B, num_features)``.

    Raises:
        ValueError: If timm does not know the name (the message suggests close names).
    """
    if not timm.is_model(cfg.backbone):
        near = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(near)}." if near else ""
        raise ValueError(f"timm has no model '{cfg.backbone}' (model.backbone).{hint}")
    backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **dict(cfg.kwargs))
    if cfg.cifar_stem:
        apply_cifar_stem(backbone)
    return backbone


def normalization_stats(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's input mean and std from timm's data config."""
    data_cfg: dict[str, Any] = timm.data.resolve_data_config({}, model=backbone)
    return tuple(data_cfg["mean"]), tuple(data_cfg["std"])


class ProjectionHead(nn.Sequential):
    """MLP projection head of SimCLR: ``[Linear -> BN -> ReLU] x (layers-1) -> Linear``, optionally
    followed by a batch norm without affine parameters (SimSiam's projector)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, output_bn: bool = False) -> None:
        """Args: in_dim: backbone features; hidden_dim: hidden width; out_dim: output; layers: >= 1;
        output_bn: end with ``BatchNorm1d(out_dim, affine=False)``."""
        if layers < 1:
            raise ValueError(f"model.proj_layers must be >= 1, got {layers}.")
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        if output_bn:  # the bias would be cancelled by the batch norm
            blocks += [nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
        else:
            blocks.append(nn.Linear(dim, out_dim))
        super().__init__(*blocks)
        self.out_dim = out_dim


class PrototypeHead(nn.Module):
    """DINO's head (Caron et al. 2021, sec. 3.1 and appendix): the projection MLP to a bottleneck,
    L2 normalisation, then a weight-normalised linear layer without bias onto K prototypes.

    The last layer's weight rows are normalised in ``forward`` (weight normalisation with the
    norm fixed to 1, DINO's ``norm_last_layer``), so its logits are cosine similarities.
    """

    def __init__(self, mlp: ProjectionHead, prototypes: int) -> None:
        """Args: mlp: the projection MLP (its output is the bottleneck); prototypes: K."""
        super().__init__()
        self.mlp = mlp
        self.prototypes = nn.Parameter(torch.empty(prototypes, mlp.out_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.out_dim = prototypes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` -> ``(B, K)`` logits."""
        z = F.normalize(self.mlp(features), dim=1)  # (B, bottleneck)
        return F.linear(z, F.normalize(self.prototypes, dim=1))  # (B, K)


class ContrastiveModel(nn.Module):
    """A backbone, a projection head and, for MoCo v3, BYOL and SimSiam, a predictor on top of the head."""

    def __init__(
        self, backbone: nn.Module, head: ProjectionHead | PrototypeHead, predictor: ProjectionHead | None = None
    ) -> None:
        """Args: backbone: maps images to features; head: maps features to projections;
        predictor: optional MLP applied to projections when ``forward(..., predict=True)``."""
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.predictor = predictor

    def forward(
        self, images: torch.Tensor | list[torch.Tensor], predict: bool = False, projections: bool = False
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, proj_dim)`` projections (predictions with ``predict=True``;
        with ``projections=True`` as well, the predictions then the projections, ``(2B, proj_dim)``).

        A list of batches at different resolutions (multi-crop: the global views, then the local
        ones) goes through the backbone one batch at a time and through the head together; the
        projections come back concatenated in list order. The predictor runs inside ``forward``,
        and all views go through one call, so that distributed data parallel sees every parameter
        used in one forward pass.
        """
        if isinstance(images, list):
            features = torch.cat([self.backbone(batch) for batch in images])  # (sum B_i, F)
        else:
            features = self.backbone(images)
        z = self.head(features)
        if predict:
            if self.predictor is None:
                raise ValueError("this model has no predictor (its objective's registry entry has predictor=False)")
            p = self.predictor(z)
            return torch.cat([p, z]) if projections else p
        return z


def feature_dim(backbone: nn.Module) -> int:
    """Width of the backbone's pooled output (timm's ``head_hidden_size`` where a pre-logits layer
    follows the pooling, as in MobileNetV3; else ``num_features``)."""
    width = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not isinstance(width, int):
        raise TypeError(f"{type(backbone).__name__} has no integer num_features: not a timm backbone?")
    return width


def create_model(cfg: ModelConfig, predictor: bool = False, prototypes: int = 0) -> ContrastiveModel:
    """Builds backbone + projection head (+ a 2-layer predictor; + DINO's prototypes) from the model config."""
    backbone = create_backbone(cfg)
    mlp = ProjectionHead(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.proj_output_bn)
    head = PrototypeHead(mlp, prototypes) if prototypes else mlp
    pred = ProjectionHead(cfg.proj_dim, cfg.predictor_hidden_dim, cfg.proj_dim, 2) if predictor else None
    return ContrastiveModel(backbone, head, pred)


def create_run_model(cfg: Config) -> ContrastiveModel:
    """The model a run of ``cfg`` trains, built as its objective's registry entry says (predictor,
    prototypes): every command that builds or loads a run's model comes through here."""
    entry = registry.get(cfg.objective.name)
    prototypes = int(objective_section(cfg).prototypes) if entry.prototypes else 0
    return create_model(cfg.model, predictor=entry.predictor, prototypes=prototypes)
