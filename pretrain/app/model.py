"""A trained model as the commands use it: a run directory or an export folder, its config and
backbone, and the one :class:`~twinview.evaluate.features.Embedder` built from them.

``twinview evaluate``, ``embed``, ``search`` and the demo load a model here; the image size, batch
size, decoding workers and normalisation all come from the run's own config and backbone.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from twinview.evaluate.features import Embedder
from twinview.evaluate.run import default_device
from twinview.pretrain.config import Config, load_config
from twinview.pretrain.models import create_backbone, normalization_stats
from twinview.pretrain.runs import CONFIG_FILE, METRICS_FILE, load_run_config, load_trained_model


@dataclass(frozen=True)
class TrainedModel:
    """A run's (or an export's) config and backbone.

    Attributes:
        path: The run directory or export folder.
        cfg: Its config (plus the command's overrides); ``data.image_size`` is in pixels.
        backbone: The trained backbone, in eval mode on the CPU.
    """

    path: Path
    cfg: Config
    backbone: nn.Module

    @property
    def training_log(self) -> Path | None:
        """The run's ``metrics.jsonl`` (None for an export, which has none)."""
        log = self.path / METRICS_FILE
        return log if log.is_file() else None

    def embedder(self, accelerator: Any | None = None, backbone: nn.Module | None = None) -> Embedder:
        """The backbone (or another of the same architecture) with the run's normalisation,
        ``eval.batch_size`` and ``data.num_workers``, on the accelerator's device (several
        processes split the work) or else CUDA when available."""
        net = self.backbone if backbone is None else backbone
        mean, std = normalization_stats(net)
        device = accelerator.device if accelerator is not None else default_device()
        return Embedder(net, mean, std, self.cfg.eval.batch_size, self.cfg.data.num_workers, device, accelerator)

    def random_init(self) -> nn.Module:
        """A randomly initialised copy of the backbone (same architecture, seed ``train.seed``)."""
        torch.manual_seed(self.cfg.train.seed)
        return create_backbone(self.cfg.model).eval()


def load_model(path: Path, overrides: tuple[str, ...] | list[str] = ()) -> TrainedModel:
    """A run directory's or an export folder's config and backbone.

    An export (``twinview export``) carries the run's config in its ``config.json``; its backbone
    is loaded the way a user would, with ``timm.create_model("local-dir:...")``.

    Raises:
        FileNotFoundError: If ``path`` is neither, or the run has not finished.
        ValueError: If its ``config.json`` was not written by ``twinview export``.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        _, model = load_trained_model(path)
        return TrainedModel(path, load_run_config(path, overrides), model.backbone)
    hub_config = path / "config.json"
    if not hub_config.is_file():
        raise FileNotFoundError(
            f"'{path}' is neither a twinview run directory ({CONFIG_FILE}) nor an export (config.json)."
        )
    saved = json.loads(hub_config.read_text()).get("twinview", {}).get("config")
    if saved is None:
        raise ValueError(f"'{hub_config}' was not written by twinview export (no 'twinview' entry).")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "config.yaml"
        recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
        cfg = load_config(recipe, overrides)
    import timm

    from twinview.pretrain.models import apply_cifar_stem

    if cfg.model.cifar_stem:  # timm cannot rebuild the stem from the name: build it, then load
        backbone = apply_cifar_stem(timm.create_model(cfg.model.backbone, num_classes=0, **dict(cfg.model.kwargs)))
        backbone.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    else:
        backbone = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    return TrainedModel(path, cfg, backbone.eval())


def launched_accelerator() -> Any | None:
    """An Accelerator under ``accelerate launch`` with several processes (they split the work of
    embedding and evaluation), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    from twinview.pretrain.distributed import join_process_group, use_cpu

    cpu = use_cpu(False)  # CPU-only machines: see use_cpu
    join_process_group(cpu)
    return Accelerator(cpu=cpu)


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch`` (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def main_print(message: str) -> None:
    """Prints once under ``accelerate launch`` (from the process of rank 0)."""
    if is_main_process():
        print(message)
