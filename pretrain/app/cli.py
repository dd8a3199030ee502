"""The ``twinview`` command: ``pretrain``, ``evaluate``, ``embed``, ``search``, ``export``, ``preview`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twinview.pretrain import __version__
from twinview.pretrain.config import ConfigError, load_config, shipped_recipes
from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.objectives import registry

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from twinview.evaluate.dataset import LabelledImages
    from twinview.pretrain.config import Config
    from twinview.pretrain.data.sources import ImageFolderDataset


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    objectives = "\n".join(
        f"  {o.name:<12} {o.summary}{' (class labels: P x K batches)' if o.supervised else ''}"
        for o in registry.OBJECTIVES.values()
    )
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone with contrastive learning",
        description="Pretrain a timm backbone. Overrides are dotted keys, e.g. data.path=/my/images optim.lr=0.3.",
        epilog=f"objectives (objective.name=NAME; settings in objective.NAME.*):\n{objectives}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default=None, help=f"recipe YAML path or shipped recipe name ({', '.join(shipped_recipes())})"
    )
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="reuse a run directory that already holds a run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a frozen backbone: without labels (--data) or with them (--train/--test)",
        description="Evaluate a frozen backbone. With --data (no labels needed): RankMe, view alignment, "
        "uniformity and similarity distributions against a random-init copy, nearest-neighbour grids, "
        "near-duplicates (duplicates.csv) and k-means clusters (clusters.csv). With --train/--test (class "
        "sub-folders): kNN, retrieval, verification and diagnostics. Both write eval.json, report.md and a "
        "self-contained report.html in the run directory (or export folder).",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR_OR_EXPORT", help="a run directory or a folder written by twinview export"
    )
    p.add_argument("--data", default=None, help="images to inspect without labels: anything data.path accepts")
    p.add_argument("--split", default="train", help="split of a Hugging Face --data source (default: train)")
    p.add_argument(
        "--duplicate-threshold", type=float, default=None, metavar="COS", help="near-duplicate cosine (default 0.985)"
    )
    p.add_argument("--clusters", type=int, default=None, metavar="K", help="k-means clusters (default: from N)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where the report, CSVs, plots and features go (default: the model's folder)",
    )
    p.add_argument("--train", default=None, help="labelled reference folder (class sub-folders)")
    p.add_argument("--test", default=None, help="labelled query folder")
    p.add_argument(
        "--baseline", action="store_true", help="also score a random-init copy with --train/--test (--data always does)"
    )
    p.add_argument("--linear-probe", action="store_true", help="also train and score a linear probe on frozen features")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.knn_k=20 eval.knn_temperature=0.07")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write the embedding of every image of a source to a Parquet or .npy file",
        description="Embed every image of a source with a trained backbone. The file's suffix picks the format: "
        ".parquet (columns path, embedding, label; read by pandas, DuckDB, datasets) or .npy (an (N, D) array, "
        "with NAME.rows.csv and NAME.meta.json beside it). An interrupted embed continues where it stopped "
        "when run again; several processes under accelerate launch split the images.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR_OR_EXPORT", help="a run directory or a folder written by twinview export"
    )
    p.add_argument(
        "--data", required=True, help="the images: anything data.path accepts (folder, file list, hf:..., shards)"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="embeddings.parquet or embeddings.npy")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="embedding type in the file")
    p.add_argument("--split", default="train", help="split of a Hugging Face source (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.batch_size=256 data.num_workers=4")


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="find the nearest images of an embedding file to new images",
        description="Exact cosine search of the query image(s) in a file written by twinview embed, with the "
        "same model; prints paths and similarities and draws a grid PNG.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR_OR_EXPORT", help="the model that made the embedding file")
    p.add_argument("--index", required=True, metavar="FILE", help="embedding file (.parquet or .npy)")
    p.add_argument("--query", required=True, metavar="IMAGE_OR_FOLDER", help="an image, or a folder of images")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--out", default="search.png", metavar="PNG", help="the grid (default: search.png)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.batch_size=64")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the backbone as timm-loadable safetensors + config.json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx package)")


def _add_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="write a PNG grid of images and their augmented views",
        description="Render originals and their views for a recipe, e.g. "
        "twinview preview --data DIR --recipe byol --out views.png augment.local_crops=4",
    )
    p.add_argument("--data", required=True, help="image folder (or builtin:digits)")
    p.add_argument("--recipe", default=None, help="augment recipe: simclr, moco_v2, byol, moco_v3")
    p.add_argument("--config", default=None, help="recipe YAML whose augment section to use")
    p.add_argument("--out", default="views.png", help="output PNG (default: views.png)")
    p.add_argument("--num", type=int, default=8, help="number of images (rows)")
    p.add_argument("--size", type=int, default=None, help="side the images are loaded at (data.image_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. augment.jitter_strength=0.5"
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain, evaluate and export on the embedded digits data set")
    p.add_argument("--output-dir", default="runs", help="parent of the demo's run directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo recipe")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from twinview.pretrain.engine.step_guard import NonFiniteTraining
    from twinview.pretrain.engine.train import TrainingInterrupted, train
    from twinview.pretrain.runs import discard_unstarted, load_run_config, new_shared_run_dir

    try:
        if args.resume:
            run_dir = Path(args.resume)
            cfg = load_run_config(run_dir, args.overrides)
            train(cfg, run_dir, resume=True, recipe=f"resumed from {run_dir}")
        else:
            cfg = load_config(args.config, args.overrides)
            run_dir = new_shared_run_dir(cfg, overwrite=args.overwrite)  # one directory for all processes
            _main_print(f"Run directory: {run_dir}")
            try:
                train(cfg, run_dir, recipe=str(args.config or ""))
            except (TrainingInterrupted, NonFiniteTraining):
                raise
            except BaseException:  # refused or failed before a checkpoint: leave nothing that blocks a retry
                if _is_main_process():
                    discard_unstarted(run_dir)
                raise
    except TrainingInterrupted as stop:
        print(f"twinview pretrain: interrupted by {stop}", file=sys.stderr)
        return 128 + stop.signum
    except NonFiniteTraining as err:
        print(f"twinview pretrain: stopped: {err}", file=sys.stderr)
        return 3
    _main_print(f"Done. Run directory: {run_dir}")
    return 0


def _is_main_process() -> bool:
    """Rank 0 under ``accelerate launch`` (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def _main_print(message: str) -> None:
    """Prints once under ``accelerate launch`` (from the process of rank 0)."""
    if _is_main_process():
        print(message)


def _print_knn(label: str, result: dict) -> None:
    line = f"{label:<22} kNN top-1 {result['knn_top1']:.4f}  top-5 {result['knn_top5']:.4f}"
    if "linear_probe" in result:
        line += f"  linear probe top-1 {result['linear_probe']['probe_top1']:.4f}"
    if "retrieval" in result:
        line += f"  MAP@R {result['retrieval']['map@r']:.4f}  ROC AUC {result['verification']['roc_auc']:.4f}"
    print(line)


def _launched_accelerator() -> Accelerator | None:
    """An Accelerator under ``accelerate launch`` with several processes (they split the feature
    extraction), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    from twinview.pretrain.distributed import use_cpu

    return Accelerator(cpu=use_cpu(False))  # CPU-only machines: see use_cpu


def _check_evaluate_options(args: argparse.Namespace) -> None:
    """The option combinations ``twinview evaluate`` refuses, before anything is loaded."""
    if bool(args.train) != bool(args.test):
        raise ValueError("--train and --test go together (a labelled reference and query set).")
    if not args.data and not args.train:
        raise ValueError("give --data SOURCE (images, no labels needed), or --train and --test (labelled folders).")
    if args.linear_probe and not args.train and not args.data:
        raise ValueError("--linear-probe needs labels: --train and --test, or a --data folder of class sub-folders.")
    if args.clusters is not None and args.clusters < 1:
        raise ValueError(f"--clusters must be at least 1, got {args.clusters}.")
    if args.duplicate_threshold is not None and not -1.0 <= args.duplicate_threshold <= 1.0:
        raise ValueError(f"--duplicate-threshold is a cosine similarity in [-1, 1], got {args.duplicate_threshold}.")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from twinview.evaluate.report import label_free_sections, labelled_sections, write_report
    from twinview.pretrain.evaluation import labelled_folders, labelled_split
    from twinview.pretrain.runs import load_backbone_for_evaluation

    _check_evaluate_options(args)
    model_dir = Path(args.run_dir)
    cfg, backbone = load_backbone_for_evaluation(model_dir, args.overrides)
    run_dir = Path(args.out) if args.out else model_dir  # where everything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    log = model_dir / "metrics.jsonl"  # a run directory's training log (an export has none)
    accelerator = _launched_accelerator()
    main_process = accelerator is None or accelerator.is_main_process
    result: dict = {}
    if args.train:
        _main_print(f"kNN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}) train={args.train} test={args.test}")
        pair = labelled_folders(args.train, args.test, cfg.data.size)
        result = _evaluate_labelled(args, run_dir, log, cfg, backbone, accelerator, *pair, baseline=args.baseline)
    elif args.data and (split := labelled_split(args.data, cfg.data.size, args.split, cfg.train.seed)) is not None:
        _main_print(
            f"{args.data} has class labels: kNN (k={cfg.eval.knn_k}) of a seeded 20% of each class "
            "against the other 80%, as well as the label-free report"
        )
        result = _evaluate_labelled(args, run_dir, log, cfg, backbone, accelerator, *split, baseline=True)
    if args.data:
        from twinview.pretrain.evaluation import evaluate_source

        _main_print(f"Label-free evaluation of {args.data} (pretrained vs random init)")
        label_free = evaluate_source(
            backbone,
            cfg,
            args.data,
            run_dir,
            made_from=str(model_dir),
            split=args.split,
            threshold=args.duplicate_threshold,
            num_clusters=args.clusters,
            accelerator=accelerator,
            training_log=None if result else log,  # else the labelled evaluation drew the curves
        )
        if label_free is not None:
            result["label_free"] = label_free
            _print_label_free(label_free)
    if not main_process:  # the other processes only help extract the features
        return 0
    diagnosed = [(n, r["diagnostics"]) for n, r in result.items() if n != "label_free"]
    diagnosed += [(f"{n}, --data", r["diagnostics"]) for n, r in result.get("label_free", {}).items() if n in NAMES]
    for name, d in diagnosed:
        if d["collapse_warning"]:
            print(f"warning ({name}): {d['collapse_warning']}")
    out = run_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    labelled = {k: v for k, v in result.items() if k != "label_free"}
    sections = labelled_sections(labelled) + (label_free_sections(result["label_free"]) if args.data else [])
    title = f"Evaluation of {model_dir.resolve().name}"
    report, page = write_report(sections, run_dir, title)
    print(f"Wrote {out}, {report}, {page} and plots in {run_dir / 'plots'}/")
    return 0


def _evaluate_labelled(
    args: argparse.Namespace,
    run_dir: Path,
    log: Path,
    cfg: Config,
    backbone: torch.nn.Module,
    accelerator: Accelerator | None,
    reference: LabelledImages,
    query: LabelledImages,
    *,
    baseline: bool,
) -> dict:
    """kNN, retrieval, verification and diagnostics of the queries against the reference set (and
    the random-init baseline)."""
    from twinview.evaluate.plots import training_curves
    from twinview.pretrain.evaluation import evaluate_backbone, random_init_backbone

    main_process = accelerator is None or accelerator.is_main_process
    plots_dir = run_dir / "plots"
    features_dir = run_dir / "features" if accelerator is None else None
    result = {
        "pretrained": evaluate_backbone(
            backbone,
            cfg,
            reference,
            query,
            probe=args.linear_probe,
            plots_dir=plots_dir if main_process else None,
            features_dir=features_dir,
            accelerator=accelerator,
        )
    }
    if not main_process:
        if baseline:
            evaluate_backbone(random_init_backbone(cfg), cfg, reference, query, accelerator=accelerator)
        return {}
    if log.is_file():  # a run directory (an export has no training log)
        result["pretrained"]["plots"].append(str(training_curves(log, plots_dir / "training.png")))
    _print_knn("pretrained backbone", result["pretrained"])
    if baseline:
        result["random_init"] = evaluate_backbone(
            random_init_backbone(cfg),
            cfg,
            reference,
            query,
            probe=args.linear_probe,
            features_dir=features_dir,
            accelerator=accelerator,
        )
        _print_knn("random-init backbone", result["random_init"])
    return result


NAMES = ("pretrained", "random_init")  # the backbones an evaluation compares


def _print_label_free(result: dict) -> None:
    """The label-free headline: RankMe and alignment of both backbones, duplicates, clusters."""
    skipped = f" ({result['skipped']} skipped)" if result["skipped"] else ""
    print(f"{result['num_images']:,} images{skipped}")
    for name in NAMES:
        if name in result:
            d = result[name]["diagnostics"]
            print(
                f"{name.replace('_', '-') + ' backbone':<22} effective rank {d['effective_rank']:.1f} of {d['dims']}"
                f"  alignment {d['alignment']:.3f}  uniformity {d['uniformity']:.3f}"
                f"  nearest-neighbour cosine {d['nn_cosine']['p50']:.3f}"
            )
    if result.get("skipped_list"):
        print(f"images that could not be decoded: {result['skipped_list']}")
    dup = result["duplicates"]
    if dup.get("warning"):
        print(f"warning: {dup['warning']}")
    print(
        f"near-duplicates at cosine >= {dup['threshold']:g}: {dup['pairs']} pair(s), {dup['exact']} exact "
        f"({dup['csv']}); {result['clusters']['k']} clusters ({result['clusters']['csv']})"
    )


def cmd_embed(args: argparse.Namespace) -> int:
    from twinview.evaluate.embed import skipped_file
    from twinview.pretrain.evaluation import embed_images
    from twinview.pretrain.runs import load_backbone_for_evaluation

    cfg, backbone = load_backbone_for_evaluation(Path(args.run_dir), args.overrides)
    accelerator = _launched_accelerator()
    _main_print(f"Embedding {args.data} at {cfg.data.size} px with {cfg.model.backbone} from {args.run_dir}")
    summary = embed_images(
        backbone,
        cfg,
        args.data,
        Path(args.out),
        made_from=str(args.run_dir),
        split=args.split,
        dtype=args.dtype,
        overwrite=args.overwrite,
        accelerator=accelerator,
    )
    resumed = f", {summary.chunks_done_before} chunk(s) from an earlier try" if summary.chunks_done_before else ""
    _main_print(
        f"Wrote {summary.rows:,} embeddings of {summary.dims} dims ({args.dtype}) to {summary.out} "
        f"in {summary.seconds:.0f} s{resumed}."
    )
    if summary.skipped:
        _main_print(f"Skipped {len(summary.skipped)} image(s) that could not be decoded: {skipped_file(summary.out)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from twinview.pretrain.evaluation import search_images
    from twinview.pretrain.runs import load_backbone_for_evaluation

    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}.")
    cfg, backbone = load_backbone_for_evaluation(Path(args.run_dir), args.overrides)
    names, hits, warnings = search_images(backbone, cfg, Path(args.index), args.query, args.k, Path(args.out))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for name, found, sims in zip(names, hits.names, hits.similarities.tolist(), strict=True):
        print(name)
        for rank, (other, sim) in enumerate(zip(found, sims, strict=True), start=1):
            print(f"  {rank:>3}  {sim:.4f}  {other}")
    print(f"Wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from twinview.pretrain.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out), onnx=args.onnx)
    print(
        f"Exported backbone to {out}/ (model.safetensors, config.json, README.md{', model.onnx' if args.onnx else ''})."
    )
    print(f'Load it with: timm.create_model("local-dir:{out}")')
    return 0


def _random_images(dataset: ImageFolderDataset, num: int, seed: int) -> torch.Tensor:
    """``(min(num, len), 3, S, S)`` uint8 images of the data set, drawn at random with ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=g)[: min(num, len(dataset))].tolist()
    return torch.stack([dataset[i][0] for i in picks])


def cmd_preview(args: argparse.Namespace) -> int:
    from twinview.augment.preview import preview
    from twinview.pretrain.data.sources import ImageFolderDataset

    overrides = [f"data.path={args.data}"]
    if args.recipe:
        overrides.append(f"augment.recipe={args.recipe}")
    if args.size:
        overrides.append(f"data.image_size={args.size}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    if cfg.data.image_size == "auto":
        from twinview.pretrain.data.survey import auto_image_size, survey

        size, why = auto_image_size(survey(cfg.data.path))
        print(f"data.image_size=auto: {size} px ({why}).")
        cfg.data.image_size = size
    images = _random_images(ImageFolderDataset(cfg.data.path, cfg.data.size), args.num, args.seed)
    out = preview(images, cfg.augment, Path(args.out), seed=args.seed)
    print(f"Wrote {out} ({cfg.augment.recipe} views of {args.num} images from {args.data}).")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from twinview.pretrain.data.builtin import materialize_digits
    from twinview.pretrain.engine.train import train
    from twinview.pretrain.evaluation import evaluate_backbone, labelled_folders, random_init_backbone
    from twinview.pretrain.export import export_run
    from twinview.pretrain.runs import load_backbone_for_evaluation, new_run_dir

    started = time.perf_counter()
    digits = materialize_digits()
    print(f"Demo data: scikit-learn digits as images in {digits} (train/ 1,497, test/ 300)")
    overrides = [f"train.output_dir={args.output_dir}", f"train.run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}"]
    cfg = load_config("demo", overrides + list(args.overrides))
    run_dir = new_run_dir(cfg)
    print(f"Pretraining {cfg.model.backbone} with SimCLR for {cfg.train.epochs} epochs -> {run_dir}")
    train(cfg, run_dir, recipe="demo")
    _, backbone = load_backbone_for_evaluation(run_dir)
    reference, query = labelled_folders(str(digits / "train"), str(digits / "test"), cfg.data.size)
    result = {
        "pretrained": evaluate_backbone(backbone, cfg, reference, query),
        "random_init": evaluate_backbone(random_init_backbone(cfg), cfg, reference, query),
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    export_dir = run_dir / "export"
    export_run(run_dir, export_dir)
    print()
    print(f"kNN on digits test (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}):")
    _print_knn("pretrained backbone", result["pretrained"])
    _print_knn("random-init backbone", result["random_init"])
    print()
    print(f"Run directory   {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, model.safetensors)")
    print(f"Evaluation      {run_dir / 'eval.json'}")
    print(f'Exported model  {export_dir}  -> timm.create_model("local-dir:{export_dir}")')
    print(f"Finished in {time.perf_counter() - started:.0f} s.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twinview`` command."""
    parser = argparse.ArgumentParser(prog="twinview", description="Self-supervised pretraining of timm backbones.")
    parser.add_argument("--version", action="version", version=f"twinview {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_embed(sub)
    _add_search(sub)
    _add_export(sub)
    _add_preview(sub)
    _add_demo(sub)
    return parser


_COMMANDS = {
    "pretrain": cmd_pretrain,
    "evaluate": cmd_evaluate,
    "embed": cmd_embed,
    "search": cmd_search,
    "export": cmd_export,
    "preview": cmd_preview,
    "demo": cmd_demo,
}


RESUME_HINTS = {  # what a command interrupted with Ctrl-C keeps
    "embed": " The chunks already embedded are kept in FILE.parts/: run the same command again to continue.",
    "evaluate": " The embeddings already made are kept in RUN_DIR/features/: run the same command again to continue.",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twinview`` console script; returns the exit status."""
    parser = build_parser()
    # Overrides may follow options (`evaluate RUN --train A --test B eval.knn_k=20`): collect them.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"twinview {args.command}: interrupted.{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, BadImage) as err:
        print(f"twinview {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
