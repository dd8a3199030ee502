"""The online monitor: kNN accuracy of the backbone on a labelled hold-out during pretraining."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from twinview.pretrain.config import Config


def monitor_knn(cfg: Config, accelerator: Accelerator, model: torch.nn.Module) -> dict[str, float]:
    """kNN top-1/top-5 of the current backbone on the monitor's hold-out (main process; others wait)."""
    from twinview.evaluate.report import evaluate_knn

    result: dict[str, float] = {}
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(model).backbone
        scores = evaluate_knn(backbone, cfg, cfg.eval.monitor_train, cfg.eval.monitor_test, device=accelerator.device)
        result = {"knn_top1": scores["knn_top1"], "knn_top5": scores["knn_top5"]}
        accelerator.print(f"monitor: kNN top-1 {result['knn_top1']:.4f} top-5 {result['knn_top5']:.4f}")
    accelerator.wait_for_everyone()
    return result
