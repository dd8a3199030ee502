"""``twinview evaluate``: a trained model scored on labelled folders (``--train/--test``), on a
source without labels (``--data``), or both, with what the run's config says.

The command resolves each source once, opens it once per way of reading it (bad images replaced for
kNN, strict for the label-free embedding, which lists them), and hands the data sets and the model's
:class:`~twinview.evaluate.features.Embedder` to :mod:`twinview.evaluate`, which knows nothing of a
run. Results are typed (:mod:`twinview.evaluate.results`); ``eval.json`` is their ``to_json()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from twinview.evaluate.dataset import LabelledImages, check_labelled_pair, split_by_class
from twinview.evaluate.results import LabelFreeResult, LabelledResult, Leaks
from twinview.pretrain.app.embedding import absolute_source, embed_images
from twinview.pretrain.app.model import TrainedModel, launched_accelerator, load_model, main_print
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import Source, resolve_source


def labelled_pair(
    reference: str, query: str, image_size: int, names: tuple[str, str] = ("--train", "--test")
) -> tuple[LabelledImages, LabelledImages]:
    """The reference and query data sets of two labelled sources, each resolved once.

    Args:
        reference: Labelled reference: a folder of class sub-folders, a labelled file list, a
            Hugging Face source with a label column or tar shards with ``.cls`` fields.
        query: Labelled query source with the same class names.
        image_size: Side the images are loaded at.
        names: How the two are called in error messages.

    Raises:
        ValueError: If a source is unlabeled or the class names differ.
    """
    pair = (
        open_images(resolve_source(reference, survey=False), image_size),
        open_images(resolve_source(query, survey=False), image_size),
    )
    check_labelled_pair(*pair, names)
    return pair


def evaluate_labelled(
    model: TrainedModel,
    reference: LabelledImages,
    query: LabelledImages,
    out_dir: Path,
    *,
    probe: bool = False,
    baseline: bool = False,
    accelerator: Any | None = None,
) -> dict[str, LabelledResult]:
    """kNN, retrieval, verification and diagnostics of the queries against the reference set, for
    the trained backbone (and its random-init copy with ``baseline``).

    Args:
        model: The trained model.
        reference: Labelled reference set.
        query: Labelled query set.
        out_dir: Where plots (``plots/``) and cached features (``features/``) go.
        probe: Also train and score a linear probe.
        baseline: Also score a random-init copy of the backbone.
        accelerator: Several processes split the feature extraction; only the main process draws
            and returns results (the others return an empty dict).

    Returns:
        ``pretrained`` (and ``random_init``) -> its result, on the main process.
    """
    from twinview.evaluate.plots import training_curves
    from twinview.evaluate.run import evaluate

    main_process = accelerator is None or accelerator.is_main_process
    plots_dir = out_dir / "plots"
    features_dir = out_dir / "features" if accelerator is None else None
    cfg = model.cfg
    embedders = {"pretrained": model.embedder(accelerator)}
    if baseline:
        embedders["random_init"] = model.embedder(accelerator, model.random_init())
    results = {}
    for name, embedder in embedders.items():
        result = evaluate(
            embedder,
            reference,
            query,
            cfg.eval,
            cfg.augment,
            probe=probe,
            seed=cfg.train.seed,
            plots_dir=plots_dir if main_process and name == "pretrained" else None,
            features_dir=features_dir,
            leaks_dir=out_dir if main_process and name == "pretrained" else None,  # a property of the data: once
            scan_workers=cfg.data.num_workers,
        )
        if name == "pretrained" and model.training_log is not None and main_process:
            curves = str(training_curves(model.training_log, plots_dir / "training.png"))
            result = _with_plot(result, curves)
        results[name] = result
        if main_process:
            print_knn(f"{name.replace('_', '-')} backbone", result)
            if result.leaks is not None:
                print_leaks(result.leaks)
    return results if main_process else {}


def _with_plot(result: LabelledResult, png: str) -> LabelledResult:
    return dataclasses.replace(result, plots=(*result.plots, png))


def evaluate_label_free(
    model: TrainedModel,
    source: Source,
    out_dir: Path,
    *,
    threshold: float | None = None,
    num_clusters: int | None = None,
    accelerator: Any | None = None,
    training_curves: bool = True,
    map_method: str = "auto",
) -> LabelFreeResult | None:
    """The label-free evaluation (:func:`twinview.evaluate.unlabelled.evaluate_unlabelled`) of a
    source, for the trained backbone against a random-init copy.

    The embeddings (trained, random init, and trained on the mirror images, for mirrored copies)
    are written to ``OUT_DIR/features/`` (Parquet, named by a hash of the data and the weights), so a
    second evaluation of the same images and weights reads them instead.

    Args:
        model: The trained model.
        source: The resolved source; labels, if any, are not used.
        out_dir: Where the CSV files, plots and embeddings go.
        threshold: Near-duplicate cosine threshold (None: the default).
        num_clusters: k of k-means (None: automatic).
        accelerator: Several processes split the embedding; only the main process scores and
            draws (the others return None).
        training_curves: Draw the run's training curves too (not when a labelled evaluation did).
        map_method: The explorer's 2-D map (``auto``, ``umap``, ``tsne``, ``pca``).

    Returns:
        The result on the main process; its plots are in ``OUT_DIR/plots/data/`` and the images
        that could not be decoded are listed in ``OUT_DIR/skipped_data.txt``.
    """
    import dataclasses

    from twinview.evaluate.config import DUPLICATE_THRESHOLD
    from twinview.evaluate.embed import skipped_file
    from twinview.evaluate.embedding_file import read_embedding_file
    from twinview.evaluate.neighbours import engine_note
    from twinview.evaluate.unlabelled import Embedded, evaluate_unlabelled

    dataset = open_images(source, model.cfg.data.size, strict=True)  # a bad image is listed, not replaced
    fingerprint = dataset.fingerprint()
    trained, random_init = model.embedder(accelerator), model.embedder(accelerator, model.random_init())
    files = {}
    for name, embedder, mirrored, desc in (
        ("pretrained", trained, False, "embed 1/3 (trained)"),
        ("random_init", random_init, False, "embed 2/3 (random init)"),
        ("pretrained_mirrored", trained, True, "embed 3/3 (trained, mirror images)"),  # for mirrored copies
    ):
        key = hashlib.sha256(f"{fingerprint}:{embedder.weights()!r}:{mirrored}".encode()).hexdigest()[:16]
        stem = Path(absolute_source(source.path).rstrip("/")).name or "data"
        files[name] = out_dir / "features" / f"{stem}-{key}.parquet"
        if not files[name].is_file():
            files[name].parent.mkdir(parents=True, exist_ok=True)
            embed_images(model, embedder, source, dataset, files[name], mirrored=mirrored, desc=desc)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    print(f"neighbour search of {len(dataset):,} images: {engine_note(len(dataset), trained.device)}")
    skipped = out_dir / "skipped_data.txt"
    listed = skipped_file(files["pretrained"])
    if listed.is_file():
        shutil.copyfile(listed, skipped)
    else:
        skipped.unlink(missing_ok=True)
    embedded = [
        Embedded("pretrained", trained, read_embedding_file(files["pretrained"])),
        Embedded("random_init", random_init, read_embedding_file(files["random_init"])),
    ]
    result = evaluate_unlabelled(
        embedded,
        dataset,
        model.cfg.augment,
        out_dir,
        source=absolute_source(source.path),
        threshold=DUPLICATE_THRESHOLD if threshold is None else threshold,
        num_clusters=num_clusters,
        training_log=model.training_log if training_curves else None,
        seed=model.cfg.train.seed,
        mirrored=read_embedding_file(files["pretrained_mirrored"]).embeddings,
        scan_workers=model.cfg.data.num_workers,
        map_method=map_method,
    )
    return dataclasses.replace(result, skipped_list=str(skipped) if skipped.is_file() else "")


def check_options(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> int:
    """``twinview evaluate MODEL [--train A --test B] [--data SOURCE] ...``"""
    from twinview.evaluate.report import label_free_sections, labelled_sections, write_report

    check_options(args)
    model = load_model(Path(args.run_dir), args.overrides)
    cfg = model.cfg
    out_dir = Path(args.out) if args.out else model.path  # where everything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = launched_accelerator()
    main_process = accelerator is None or accelerator.is_main_process
    data = resolve_source(args.data, split=args.split, survey=False) if args.data else None  # resolved once
    labelled: dict[str, LabelledResult] = {}
    if args.train:
        main_print(f"kNN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}) train={args.train} test={args.test}")
        reference, query = labelled_pair(args.train, args.test, cfg.data.size)
        labelled = evaluate_labelled(
            model, reference, query, out_dir, probe=args.linear_probe, baseline=args.baseline, accelerator=accelerator
        )
    elif data is not None and (data.index is None or data.index.labeled):
        images = open_images(data, cfg.data.size)  # bad images replaced, as kNN reads them
        if images.index.labeled:
            main_print(
                f"{args.data} has class labels: kNN (k={cfg.eval.knn_k}) of a seeded 20% of each class "
                "against the other 80%, as well as the label-free report"
            )
            reference, query = split_by_class(images, seed=cfg.train.seed)
            labelled = evaluate_labelled(
                model, reference, query, out_dir, probe=args.linear_probe, baseline=True, accelerator=accelerator
            )
    label_free = None
    if data is not None:
        main_print(f"Label-free evaluation of {args.data} (pretrained vs random init)")
        label_free = evaluate_label_free(
            model,
            data,
            out_dir,
            threshold=args.duplicate_threshold,
            num_clusters=args.clusters,
            accelerator=accelerator,
            training_curves=not labelled,  # else the labelled evaluation drew the curves
            map_method=args.map,
        )
        if label_free is not None:
            print_label_free(label_free)
    if not main_process:  # the other processes only help extract the features
        return 0
    diagnosed = [(name, r.diagnostics) for name, r in labelled.items()]
    diagnosed += [(f"{name}, --data", d) for name, d in (label_free.backbones if label_free else {}).items()]
    for name, d in diagnosed:
        if d.collapse_warning:
            print(f"warning ({name}): {d.collapse_warning}")
    out = out_dir / "eval.json"
    report: dict[str, Any] = {name: r.to_json() for name, r in labelled.items()}
    if label_free is not None:
        report["label_free"] = label_free.to_json()
    out.write_text(json.dumps(report, indent=2) + "\n")
    sections = labelled_sections(labelled) + (label_free_sections(label_free) if label_free is not None else [])
    markdown, page = write_report(sections, out_dir, f"Evaluation of {model.path.resolve().name}")
    print(f"Wrote {out}, {markdown}, {page} and plots in {out_dir / 'plots'}/")
    return 0


def print_knn(label: str, result: LabelledResult) -> None:
    """One line: kNN top-1 / top-5, and the probe, MAP@R and ROC AUC where present."""
    line = f"{label:<22} kNN top-1 {result.knn.top1:.4f}  top-5 {result.knn.top5:.4f}"
    if result.linear_probe is not None:
        line += f"  linear probe top-1 {result.linear_probe.top1:.4f}"
    line += f"  MAP@R {result.retrieval['map@r']:.4f}  ROC AUC {result.verification['roc_auc']:.4f}"
    print(line)


def print_leaks(leaks: Leaks) -> None:
    """The leak check's line, and its warning."""
    line = f"leaks: {leaks.leaked} of {leaks.test_images} test images are near-duplicates of training images"
    if leaks.leaked:
        line += f" ({leaks.exact} byte copies; {leaks.csv})"
        if leaks.knn_top1_without is not None:
            line += f"; kNN top-1 without them {leaks.knn_top1_without:.4f}"
        if leaks.probe_top1_without is not None:
            line += f", linear probe top-1 {leaks.probe_top1_without:.4f}"
    print(line)
    if leaks.warning:
        print(f"warning: {leaks.warning}")


def print_label_free(result: LabelFreeResult) -> None:
    """The label-free headline: RankMe and alignment of both backbones, duplicates, clusters."""
    from twinview.evaluate.explorer import MAX_ROWS as EXPLORER_MAX_ROWS

    skipped = f" ({result.skipped} skipped)" if result.skipped else ""
    print(f"{result.num_images:,} images{skipped}")
    for name, d in result.backbones.items():
        nn_cosine = f"  nearest-neighbour cosine {d.similarity.nn_cosine.p50:.3f}" if d.similarity else ""
        print(
            f"{name.replace('_', '-') + ' backbone':<22} effective rank {d.effective_rank:.1f} of {d.dims}"
            f"  alignment {d.alignment:.3f}  uniformity {d.uniformity:.3f}{nn_cosine}"
        )
    if result.skipped_list:
        print(f"images that could not be decoded: {result.skipped_list}")
    dup = result.duplicates
    if dup.warning:
        print(f"warning: {dup.warning}")
    rules = ", ".join(f"{n} by {rule}" for rule, n in dup.by_rule)
    print(
        f"near-duplicates: {dup.pairs} pair(s) ({rules}; cosine >= {dup.threshold:g}), {dup.exact} exact "
        f"({dup.csv}); {result.clusters.k} clusters ({result.clusters.csv})"
    )
    if result.outliers is not None:
        o = result.outliers
        print(
            f"outliers: every image ranked by uniqueness, most unusual first ({o.csv}); "
            f"{o.near_constant} near-constant, {o.tiny} tiny"
        )
    if result.explorer:
        print(f"explorer: {result.explorer} (map: {result.map_method}); open it in a browser")
    else:
        print(f"explorer: not written for {result.num_images:,} images (at most {EXPLORER_MAX_ROWS:,})")
