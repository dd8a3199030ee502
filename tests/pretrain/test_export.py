"""Exported weights load into plain timm, strictly, and give the trained backbone's features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from twinview.pretrain.app.export import export_backbone
from twinview.pretrain.config import load_config
from twinview.pretrain.models import apply_cifar_stem, create_backbone


def _trained_like_backbone(cfg):
    torch.manual_seed(1)
    backbone = create_backbone(cfg.model)
    with torch.no_grad():  # move away from timm's init so a silent re-init would be caught
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, buf in backbone.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return backbone.eval()


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_loads_export_strictly_with_identical_features(tmp_path: Path, arch: str) -> None:
    size = 224 if arch.startswith("vit") else 32
    cfg = load_config("demo", [f"model.backbone={arch}", f"data.image_size={size}"])
    backbone = _trained_like_backbone(cfg)
    out = export_backbone(backbone, cfg, tmp_path / "export")
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == backbone.state_dict().keys()  # timm key names, backbone only

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch and config["num_classes"] == 0
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, size, size] and pcfg["num_classes"] == 0
    assert pcfg["mean"] == list(timm.data.resolve_data_config({}, model=backbone)["mean"])
    assert pcfg["tag"] == "twinview_simclr" and config["twinview"]["objective"] == "simclr"

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = backbone(x)
        via_overlay = timm.create_model(
            arch,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0),
        ).eval()
        via_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(via_overlay(x), expected)
        torch.testing.assert_close(via_dir(x), expected)
    assert via_dir.pretrained_cfg["input_size"] == (3, size, size)


def test_finetuning_head_can_be_added(tmp_path: Path) -> None:
    cfg = load_config("demo")
    out = export_backbone(_trained_like_backbone(cfg), cfg, tmp_path / "e")
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cifar_stem_export_loads_after_applying_the_stem(tmp_path: Path) -> None:
    cfg = load_config("demo", ["model.cifar_stem=true"])
    backbone = _trained_like_backbone(cfg)
    out = export_backbone(backbone, cfg, tmp_path / "e")
    assert json.loads((out / "config.json").read_text())["twinview"]["cifar_stem"] is True
    model = apply_cifar_stem(timm.create_model("resnet18", num_classes=0))
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), backbone(x))
