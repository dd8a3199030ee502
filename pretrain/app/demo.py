"""``twinview demo``: pretrain, evaluate and export on the embedded digits, with nothing to download."""

from __future__ import annotations

import argparse
import json
import time

from twinview.pretrain.config import load_config


def run(args: argparse.Namespace) -> int:
    """``twinview demo [--output-dir DIR] KEY=VALUE ...``"""
    from twinview.pretrain.app.evaluation import evaluate_labelled, labelled_pair
    from twinview.pretrain.app.export import export_run
    from twinview.pretrain.app.model import load_model
    from twinview.pretrain.data.builtin import materialize_digits
    from twinview.pretrain.engine.train import train
    from twinview.pretrain.runs import new_run_dir

    started = time.perf_counter()
    digits = materialize_digits()
    print(f"Demo data: scikit-learn digits as images in {digits} (train/ 1,497, test/ 300)")
    overrides = [f"train.output_dir={args.output_dir}", f"train.run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}"]
    cfg = load_config("demo", overrides + list(args.overrides))
    run_dir = new_run_dir(cfg)
    print(f"Pretraining {cfg.model.backbone} with SimCLR for {cfg.train.epochs} epochs -> {run_dir}")
    train(cfg, run_dir, recipe="demo")
    model = load_model(run_dir)
    reference, query = labelled_pair(str(digits / "train"), str(digits / "test"), model.cfg.data.size)
    print()
    print(f"kNN on digits test (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}):")
    result = evaluate_labelled(model, reference, query, run_dir, baseline=True)
    (run_dir / "eval.json").write_text(json.dumps({k: r.to_json() for k, r in result.items()}, indent=2) + "\n")
    export_dir = run_dir / "export"
    export_run(run_dir, export_dir)
    print()
    print(f"Run directory   {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, model.safetensors)")
    print(f"Evaluation      {run_dir / 'eval.json'}, plots in {run_dir / 'plots'}/ (features cached in features/)")
    print(f'Exported model  {export_dir}  -> timm.create_model("local-dir:{export_dir}")')
    print(f"Finished in {time.perf_counter() - started:.0f} s.")
    return 0
