"""The ``twinview`` command: ``pretrain``, ``evaluate``, ``finetune``, ``embed``, ``search``, ``leaks``, ``export``,
``preview`` and ``demo``. This module parses the command line and hands each command to its module in this package;
run it as ``twinview ...`` or ``python -m twinview.pretrain.app.cli ...`` (``accelerate launch``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from twinview.evaluate.config import DUPLICATE_THRESHOLD, MAP_METHODS, TSNE_MAX_ROWS
from twinview.pretrain import __version__
from twinview.pretrain.config import ConfigError, shipped_recipes
from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.objectives import registry


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    objectives = "\n".join(
        f"  {o.name:<12} {o.summary}{' (class labels: P x K batches)' if o.supervised else ''}"
        for o in registry.objectives().values()
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
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        default=None,
        help="continue a run from its latest checkpoint; auto: train.output_dir/train.run_name if it holds a run "
        "of the same settings, else start it (the command a restarted or requeued job repeats; train.resume=auto)",
    )
    p.add_argument("--overwrite", action="store_true", help="reuse a run directory that already holds a run")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module or .py file that registers objectives of its own (repeatable; saved in config.yaml as "
        "objective.plugins, so resume, evaluate, embed and export load it too)",
    )
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
    _add_duplicate_threshold(p)
    p.add_argument("--clusters", type=int, default=None, metavar="K", help="k-means clusters (default: from N)")
    _add_map(p)
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


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="does pretraining pay? fine-tune with few labels, pretrained against from scratch",
        description="Fine-tune the whole backbone with a fresh classifier on class-balanced, seeded, nested subsets "
        "of the training labels (--labels), the same recipe from a random init (--baseline) and a linear probe of "
        "the frozen features on the same subsets; writes finetune.json, label_efficiency.png, report.md/html and "
        "the best pretrained fine-tune in timm's format (OUT/export).",
    )
    p.add_argument("model", metavar="RUN_DIR_OR_EXPORT", help="a run directory or a folder written by twinview export")
    p.add_argument("--train", required=True, help="labelled training images: anything data.path accepts, with labels")
    p.add_argument("--test", required=True, help="labelled test images with the same classes")
    p.add_argument(
        "--labels",
        default="1%,10%,100%",
        help="label budgets: percentages or counts per class (default: 1%%,10%%,100%%; e.g. 10/class,100%%)",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune a random init (default: on)",
    )
    p.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a linear probe per budget (default: on)",
    )
    p.add_argument("--epochs", type=int, default=30, help="passes over each subset (default: 30)")
    p.add_argument(
        "--min-steps", type=int, default=200, help="steps each fine-tune takes at least: small subsets get more epochs"
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per process per step (default: 128)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW lr (default: 1e-3 per 256 images, ViTs 5e-4)")
    p.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="layer-wise lr decay of the pretrained fine-tune, not the baseline (default: ViTs 0.75, CNNs off)",
    )
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--precision", default="auto", help="auto, no, bf16 or fp16 (auto: bf16 where native)")
    p.add_argument("--seed", type=int, default=0, help="subsets, heads, data order and views")
    p.add_argument(
        "--crop-scale", default="0.25,1", metavar="LOW,HIGH", help="area range of the training crops (default: 0.25,1)"
    )
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (default: on)"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: MODEL/finetune)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds results")
    p.add_argument(
        "--export", action=argparse.BooleanOptionalAction, default=True, help="export the best fine-tune (default: on)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="of the model's config, e.g. data.num_workers=4")


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
    p.add_argument(
        "--index",
        choices=("ivf", "hnsw"),
        default=None,
        help="also write a faiss index beside the file (FILE.faiss), which twinview search then uses; needs "
        "pip install twinview[scale]",
    )
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


def _add_leaks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "leaks",
        help="test images that are near-duplicates of training images (no labels needed)",
        description="Compare two splits: every test image whose nearest training image is at the near-duplicate "
        "cosine, or whose perceptual hash (or its mirror's) is within 10 of 64 bits of a training image's, goes to "
        "leaks.csv (test image, training image, cosine, byte copy, rule), and explorer.html shows both splits on one "
        "map with the leaks flagged. Uses the given run's or export's backbone.",
    )
    p.add_argument("model", metavar="RUN_DIR_OR_EXPORT", help="a run directory or a folder written by twinview export")
    p.add_argument("--train", required=True, help="the training images: anything data.path accepts")
    p.add_argument("--test", required=True, help="the test images")
    _add_duplicate_threshold(p)
    _add_map(p)
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where leaks.csv and explorer.html go (default: MODEL/leaks)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="of the model's config, e.g. data.num_workers=4")


def _add_duplicate_threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--duplicate-threshold",
        type=float,
        default=None,
        metavar="COS",
        help=f"near-duplicate cosine (default {DUPLICATE_THRESHOLD})",
    )


def _add_map(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--map",
        choices=MAP_METHODS,
        default="auto",
        help="the explorer's 2-D map (default auto: UMAP where umap-learn is installed, else t-SNE up to "
        f"{TSNE_MAX_ROWS:,} images, else PCA)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain, evaluate and export on the embedded digits data set")
    p.add_argument("--output-dir", default="runs", help="parent of the demo's run directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo recipe")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twinview`` command."""
    parser = argparse.ArgumentParser(prog="twinview", description="Self-supervised pretraining of timm backbones.")
    parser.add_argument("--version", action="version", version=f"twinview {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_finetune(sub)
    _add_embed(sub)
    _add_search(sub)
    _add_leaks(sub)
    _add_export(sub)
    _add_preview(sub)
    _add_demo(sub)
    return parser


# command -> (module of twinview.pretrain.app, function): imported when the command runs, so that
# `twinview --help` and argument errors load no torch
_COMMANDS = {
    "pretrain": ("training", "run"),
    "evaluate": ("evaluation", "run"),
    "finetune": ("finetuning", "run"),
    "embed": ("embedding", "run_embed"),
    "search": ("embedding", "run_search"),
    "leaks": ("leaks", "run"),
    "export": ("export", "run"),
    "preview": ("preview", "run"),
    "demo": ("demo", "run"),
}


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module, function = _COMMANDS[name]
    run: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f"twinview.pretrain.app.{module}"), function
    )
    return run


RESUME_HINTS = {  # what a command interrupted with Ctrl-C keeps
    "embed": " The chunks already embedded are kept in FILE.parts/: run the same command again to continue.",
    "evaluate": " The embeddings already made are kept in RUN_DIR/features/: run the same command again to continue.",
    "finetune": " Finished fine-tunes and the last checkpoint are kept: add --resume to the same command to continue.",
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
        return _command(args.command)(args)
    except KeyboardInterrupt:
        print(f"twinview {args.command}: interrupted.{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, BadImage) as err:
        print(f"twinview {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
