"""Backbone creation, CIFAR stem and projection head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinview.pretrain.config import ModelConfig
from twinview.pretrain.models import ProjectionHead, apply_cifar_stem, create_backbone, create_model, feature_dim


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_any_timm_backbone_gives_pooled_features(name: str) -> None:
    backbone = create_backbone(ModelConfig(backbone=name))
    size = 224 if name.startswith("vit") else 32
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, feature_dim(backbone))
    assert create_model(ModelConfig(backbone=name, proj_dim=8)).eval()(torch.randn(2, 3, size, size)).shape == (2, 8)


def test_cifar_stem_keeps_resolution() -> None:
    standard = create_backbone(ModelConfig(backbone="resnet18"))
    cifar = create_backbone(ModelConfig(backbone="resnet18", cifar_stem=True))
    x = torch.randn(2, 3, 32, 32)
    assert standard.forward_features(x).shape[-1] == 1  # 32 -> 1 with the ImageNet stem
    assert cifar.forward_features(x).shape[-1] == 4  # 32 -> 4 with the CIFAR stem
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="single-conv stem"):
        apply_cifar_stem(create_backbone(ModelConfig(backbone="vit_tiny_patch16_224")))


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"timm has no model 'resnet181'.*Close names: .*resnet18"):
        create_backbone(ModelConfig(backbone="resnet181"))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_projection_head_depth(layers: int) -> None:
    head = ProjectionHead(16, 32, 8, layers)
    assert sum(isinstance(m, nn.Linear) for m in head) == layers
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_model_composes_backbone_and_head() -> None:
    model = create_model(ModelConfig(backbone="resnet18", proj_hidden_dim=64, proj_dim=16))
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 16)
    assert all(k.startswith(("backbone.", "head.")) for k in model.state_dict())
