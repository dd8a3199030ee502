"""``twinview leaks MODEL --train A --test B``: the test images that are near-duplicates of training
images, with or without labels, before any score is trusted."""

from __future__ import annotations

import argparse
from pathlib import Path

from twinview.evaluate.config import DUPLICATE_THRESHOLD
from twinview.evaluate.label_free import LEAK_WARN_FRACTION
from twinview.pretrain.app.model import load_model
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import resolve_source
from twinview.pretrain.runs import CONFIG_FILE


def run(args: argparse.Namespace) -> int:
    """Embeds both sources with the model's backbone, hashes them, and writes ``leaks.csv`` and an
    explorer of both splits (``explorer.html``)."""
    from twinview.evaluate.explorer import MAX_ROWS as EXPLORER_MAX_ROWS
    from twinview.evaluate.neighbours import engine_note
    from twinview.evaluate.run import detect_leaks, leaks_explorer

    model = load_model(Path(args.model), args.overrides)
    kind = "the run's trained backbone" if (model.path / CONFIG_FILE).is_file() else "the exported backbone"
    out = Path(args.out) if args.out else model.path / "leaks"
    out.mkdir(parents=True, exist_ok=True)
    size = model.cfg.data.size
    train = open_images(resolve_source(args.train, survey=False), size)
    test = open_images(resolve_source(args.test, survey=False), size)
    print(f"Comparing {len(test):,} test images with {len(train):,} training images; backbone: {kind} ({model.path})")
    embedder = model.embedder()
    train_x, _ = embedder.features(train, out / "features")
    test_x, _ = embedder.features(test, out / "features")
    print(f"neighbour search of {len(train):,} training images: {engine_note(len(train), train_x.device)}")
    threshold = DUPLICATE_THRESHOLD if args.duplicate_threshold is None else args.duplicate_threshold
    found, exact, path = detect_leaks(
        train_x, test_x, train, test, out, workers=model.cfg.data.num_workers, threshold=threshold
    )
    share = len(found) / max(1, len(test))
    print(
        f"leaks: {len(found)} of {len(test)} test images ({share:.1%}) are near-duplicates of training images "
        f"({sum(exact)} byte copies): {path}"
    )
    if share > LEAK_WARN_FRACTION:
        print("warning: scores on this test set are inflated; evaluate on the test images that did not leak")
    if len(train) + len(test) > EXPLORER_MAX_ROWS:
        print(f"explorer: not written for {len(train) + len(test):,} images (at most {EXPLORER_MAX_ROWS:,})")
        return 0
    page, method = leaks_explorer(
        train_x,
        test_x,
        train,
        test,
        found,
        out / "explorer.html",
        map_method=args.map,
        seed=model.cfg.train.seed,
        workers=model.cfg.data.num_workers,
    )
    print(f"explorer: {page} (map: {method}; both splits, leaks flagged); open it in a browser")
    return 0
