"""Export a trained backbone as timm-loadable ``model.safetensors`` + ``config.json``.

Uses timm's own ``save_for_hf``, so the folder is exactly what timm writes for the Hugging Face hub:
``timm.create_model("local-dir:DIR")`` loads it, and so does
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=DIR/"model.safetensors"))``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from torch import nn

from twinview.pretrain.config import Config, as_dict, objective_section
from twinview.pretrain.models import normalization_stats
from twinview.pretrain.objectives.registry import get
from twinview.pretrain.runs import load_trained_model


def _arxiv_id(paper: str) -> str:
    """``arXiv:NNNN.NNNNN`` from a registry entry's paper, or the paper itself."""
    found = re.search(r"arXiv:\d{4}\.\d{4,5}", paper)
    return found.group(0) if found else paper


def _settings(section: Any) -> str:
    """``temperature 0.2, queue_size 4096, ...`` of an objective's config section."""
    return ", ".join(f"{f.name} {getattr(section, f.name)}" for f in dataclasses.fields(section))


def export_backbone(backbone: nn.Module, cfg: Config, out_dir: Path, label_names: Sequence[str] | None = None) -> Path:
    """Writes the backbone's weights (timm key names) and timm pretrained config to ``out_dir``.

    The pretrained config records the training resolution as ``input_size``, the normalisation the
    backbone was trained with, ``crop_pct=1.0`` (images were resized, not cropped, to that size) and
    the model's ``num_classes`` (0 for a pretrained backbone; a fine-tuned classifier's classes,
    with their ``label_names``, from ``twinview finetune``). A ``twinview`` entry records the recipe.
    A CIFAR-stem ResNet cannot be rebuilt by timm from its name alone: apply
    :func:`twinview.pretrain.models.apply_cifar_stem` to ``timm.create_model(arch)`` before loading
    its ``model.safetensors``.

    Args:
        backbone: The trained backbone (``num_classes=0``), or a fine-tuned classifier.
        cfg: The run's config.
        out_dir: Output folder (created).
        label_names: Class names of a classifier's outputs, in order.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    mean, std = normalization_stats(backbone)
    size = cfg.data.size
    data_config = {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
    }
    # The source cfg describes timm's own ImageNet weights; these are not those.
    pretrained_cfg: dict[str, Any] = {
        "tag": f"twinview_{cfg.objective.name}",
        "num_classes": getattr(backbone, "num_classes", 0),
        "paper_ids": _arxiv_id(get(cfg.objective.name).paper),
        "license": None,
        "origin_url": None,
    }
    twinview_info = {
        "objective": cfg.objective.name,
        "cifar_stem": cfg.model.cifar_stem,
        "epochs": cfg.train.epochs,
        "data": cfg.data.path,
        "config": as_dict(cfg),
    }
    save_for_hf(
        backbone,
        str(out_dir),
        model_config={
            "pretrained_cfg": pretrained_cfg,
            "twinview": twinview_info,
            **({"label_names": list(label_names)} if label_names else {}),
        },
        model_args=dict(cfg.model.kwargs) or None,  # timm passes these to create_model on load
        safe_serialization=True,
        data_config=data_config,
    )
    return out_dir


def export_onnx(backbone: nn.Module, size: int, path: Path) -> Path:
    """Writes the backbone as ONNX (input ``images`` (B, 3, size, size) normalised, output
    ``features`` (B, D)), with a dynamic batch axis.

    Uses PyTorch's TorchScript-based exporter (``dynamo=False``): the newer torch.export-based one
    needs the separate ``onnxscript`` package, and the TorchScript one handles timm's CNNs and ViTs.
    """
    import torch

    was_training = backbone.training
    backbone.eval()
    example = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():  # the deprecation notice of the TorchScript exporter, chosen above
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        _onnx_export(torch, backbone, example, path)
    backbone.train(was_training)
    return Path(path)


def _onnx_export(torch: Any, backbone: nn.Module, example: Any, path: Path) -> None:
    torch.onnx.export(
        backbone,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
    )


def model_card(cfg: Config, out_dir: Path, evaluation: dict[str, Any] | None = None) -> Path:
    """Writes ``README.md``: what was trained, how, on what, its evaluation, and how to load it."""
    o, a, t = cfg.objective, cfg.augment, cfg.train
    lines = [
        f"# {cfg.model.backbone}, self-supervised with twinview ({o.name})",
        "",
        "Backbone weights (no classifier) in timm's format, trained without labels unless the objective is supervised.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| architecture | `{cfg.model.backbone}`{' (CIFAR stem)' if cfg.model.cifar_stem else ''}"
        f"{' ' + json.dumps(dict(cfg.model.kwargs)) if cfg.model.kwargs else ''} |",
        f"| objective | `{o.name}` ({get(o.name).paper}): {_settings(objective_section(cfg))} |",
        f"| views | recipe `{a.recipe}`, {cfg.data.size} px |",
        f"| data | `{cfg.data.path}` |",
        f"| schedule | {t.epochs} epochs, batch {t.batch_size} per process, `{cfg.optim.name}` lr {cfg.optim.lr}, "
        f"weight decay {cfg.optim.weight_decay}, warm-up {cfg.optim.warmup_epochs} epoch(s) + cosine |",
        f"| precision | {t.mixed_precision} |",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation (frozen features)", "", "| backbone | metric | value |", "| --- | --- | --- |"]
        for name, r in evaluation.items():
            if name == "label_free":  # twinview evaluate --data: no labels, no kNN
                for backbone in ("pretrained", "random_init"):
                    if backbone in r:
                        d = r[backbone]["diagnostics"]
                        lines.append(
                            f"| {backbone} | effective rank (RankMe) on `{r['source']}` "
                            f"| {d['effective_rank']:.1f} of {d['dims']} |"
                        )
                continue
            lines.append(f"| {name} | kNN top-1 / top-5 (k={r['k']}) | {r['knn_top1']:.4f} / {r['knn_top5']:.4f} |")
            if "linear_probe" in r:
                lines.append(f"| {name} | linear probe top-1 | {r['linear_probe']['probe_top1']:.4f} |")
            if "retrieval" in r:
                lines.append(
                    f"| {name} | MAP@R / recall@1 | {r['retrieval']['map@r']:.4f} / {r['retrieval']['recall@1']:.4f} |"
                )
        lines.append("")
    else:
        lines += [
            "Not evaluated yet: `twinview evaluate RUN_DIR --train DIR --test DIR` before exporting adds the numbers.",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{out_dir}", pretrained=True, num_classes=10)  # fine-tune',
        "```",
        "",
    ]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path


def export_run(run_dir: Path, out_dir: Path, onnx: bool = False) -> Path:
    """Exports the backbone of a finished run directory, with a model card (``README.md``) that
    includes the run's evaluation when ``twinview evaluate`` has written ``eval.json``.

    Args:
        run_dir: A run with final weights.
        out_dir: Output folder.
        onnx: Also write ``model.onnx`` (see :func:`export_onnx`).

    Returns:
        ``out_dir``.
    """
    cfg, model = load_trained_model(run_dir)
    export_backbone(model.backbone, cfg, out_dir)
    eval_file = Path(run_dir) / "eval.json"
    model_card(cfg, Path(out_dir), json.loads(eval_file.read_text()) if eval_file.is_file() else None)
    if onnx:
        export_onnx(model.backbone, cfg.data.size, Path(out_dir) / "model.onnx")
    return Path(out_dir)


def run(args: argparse.Namespace) -> int:
    """``twinview export RUN_DIR --out DIR [--onnx]``"""
    out = export_run(Path(args.run_dir), Path(args.out), onnx=args.onnx)
    print(
        f"Exported backbone to {out}/ (model.safetensors, config.json, README.md{', model.onnx' if args.onnx else ''})."
    )
    print(f'Load it with: timm.create_model("local-dir:{out}")')
    return 0
