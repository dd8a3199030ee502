"""The online monitor: kNN accuracy of the backbone on a labelled hold-out during pretraining."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from twinview.pretrain.config import Config
from twinview.pretrain.models import normalization_stats


def monitor_knn(cfg: Config, accelerator: Accelerator, model: torch.nn.Module) -> dict[str, float]:
    """kNN top-1/top-5 of the current backbone on the monitor's hold-out (main process; others wait).

    Args:
        cfg: The run's config: ``eval.monitor_train`` / ``eval.monitor_test`` are the labelled
            reference and query folders, loaded at ``data.image_size``.
        accelerator: The training run's accelerator (its device runs the extraction).
        model: The (possibly wrapped) training model; its ``backbone`` is scored.

    Returns:
        ``knn_top1`` and ``knn_top5`` on the main process, an empty dict on the others.
    """
    # imported on the first monitored epoch, so runs without the monitor never load scikit-learn
    from twinview.evaluate.run import knn_only
    from twinview.pretrain.evaluation import labelled_folders

    result: dict[str, float] = {}
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(model).backbone
        reference, query = labelled_folders(
            cfg.eval.monitor_train,
            cfg.eval.monitor_test,
            cfg.data.size,
            names=("eval.monitor_train", "eval.monitor_test"),
        )
        mean, std = normalization_stats(backbone)
        scores = knn_only(
            backbone, reference, query, cfg.eval, mean, std, num_workers=cfg.data.num_workers, device=accelerator.device
        )
        result = {"knn_top1": scores["knn_top1"], "knn_top5": scores["knn_top5"]}
        accelerator.print(f"monitor: kNN top-1 {result['knn_top1']:.4f} top-5 {result['knn_top5']:.4f}")
    accelerator.wait_for_everyone()
    return result
