"""The online monitor: kNN accuracy of the backbone on a labelled hold-out during pretraining."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from twinview.evaluate.config import EvalConfig
from twinview.evaluate.dataset import LabelledImages, check_labelled_pair
from twinview.evaluate.features import Embedder
from twinview.pretrain.config import Config
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import resolve_source
from twinview.pretrain.models import normalization_stats


@dataclass(frozen=True)
class Monitor:
    """The monitor's labelled reference and query sets, opened once when the run is built.

    Attributes:
        reference: ``eval.monitor_train`` at ``data.image_size``.
        query: ``eval.monitor_test`` with the same classes.
        eval_cfg: kNN k and temperature, extraction batch size.
        num_workers: Decoding workers (``data.num_workers``).
    """

    reference: LabelledImages
    query: LabelledImages
    eval_cfg: EvalConfig
    num_workers: int


def build_monitor(cfg: Config) -> Monitor | None:
    """The monitor of a run with ``eval.monitor_every`` set (None without), its folders resolved and
    checked (labelled, with the same classes) before the first step.

    Raises:
        ValueError: If a folder is unlabeled or the class names differ.
    """
    if not cfg.eval.monitor_every:
        return None
    reference = open_images(resolve_source(cfg.eval.monitor_train, survey=False), cfg.data.size)
    query = open_images(resolve_source(cfg.eval.monitor_test, survey=False), cfg.data.size)
    check_labelled_pair(reference, query, ("eval.monitor_train", "eval.monitor_test"))
    return Monitor(reference, query, cfg.eval, cfg.data.num_workers)


def monitor_knn(monitor: Monitor, accelerator: Accelerator, model: torch.nn.Module) -> dict[str, float]:
    """kNN top-1/top-5 of the current backbone on the monitor's hold-out (main process; others wait).

    Args:
        monitor: From :func:`build_monitor`.
        accelerator: The training run's accelerator (its device runs the extraction).
        model: The (possibly wrapped) training model; its ``backbone`` is scored.

    Returns:
        ``knn_top1`` and ``knn_top5`` on the main process, an empty dict on the others.
    """
    # imported on the first monitored epoch, so runs without the monitor never load scikit-learn
    from twinview.evaluate.run import knn_only

    result: dict[str, float] = {}
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(model).backbone
        mean, std = normalization_stats(backbone)
        embedder = Embedder(backbone, mean, std, monitor.eval_cfg.batch_size, monitor.num_workers, accelerator.device)
        scores = knn_only(embedder, monitor.reference, monitor.query, monitor.eval_cfg)
        result = {"knn_top1": scores.top1, "knn_top5": scores.top5}
        accelerator.print(f"monitor: kNN top-1 {result['knn_top1']:.4f} top-5 {result['knn_top5']:.4f}")
    accelerator.wait_for_everyone()
    return result
