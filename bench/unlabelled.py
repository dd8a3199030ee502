"""The label-free path measured: embed throughput, near-duplicates found on a planted set, search latency.

On Imagewoof-96 ``val`` (``../shared/data/imagewoof-96.tar.gz``), with a trained run (``--run``; without
it, ``moco-v2-photos`` is pretrained on ``train`` for ``--epochs`` first):

1. ``embed``: images/s of ``twinview embed`` (Parquet) vs the feature path of ``twinview evaluate``
   (``Embedder.features``) on the same images, medians of ``--repeats`` runs each, interleaved; also on
   CIFAR-10 ``test`` when its archive is there.
2. ``duplicates``: 100 val images copied back into a copy of the folder after a small change (34
   crops of 90 % of the side, 33 JPEG re-encodings at quality 70, 33 horizontal flips); then
   ``twinview evaluate RUN --data`` as a user runs it, and, per cosine threshold, how many of the
   100 planted pairs are found (recall) and how many other pairs are reported, for the trained and the
   random-init backbone. The other pairs at the default threshold are listed for a look (Imagewoof
   has real near-duplicates of its own).
3. ``search``: 10 queries against 50,000 embeddings (512-d, float32, Parquet and .npy), median of
   5 searches, and ``twinview search`` end to end.
4. RankMe (effective rank) of the trained vs random-init backbone, from the report.

Prints one JSON object. Usage: python bench/unlabelled.py [--run RUN_DIR] [--epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from host import host_kind
from PIL import Image

from twinview.evaluate.embedding_file import write_embedding_file
from twinview.evaluate.search import search
from twinview.pretrain.app.cli import main as twinview
from twinview.pretrain.app.embedding import absolute_source, embed_images
from twinview.pretrain.app.model import load_model
from twinview.pretrain.data.builtin import cache_dir, extract_archive
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import resolve_source

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
T = TypeVar("T")
THRESHOLDS = (0.8, 0.9, 0.95, 0.97, 0.98, 0.985, 0.99)


def quiet(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs ``fn`` with its stdout sent to stderr (stdout carries only the JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args, **kwargs)


def pretrained_run(args: argparse.Namespace, woof: Path) -> Path:
    if args.run:
        return Path(args.run)
    runs = cache_dir() / "bench-runs"
    name = f"unlabelled-{time.strftime('%Y%m%d-%H%M%S')}"
    code = quiet(
        twinview,
        [
            "pretrain",
            "--config",
            "moco-v2-photos",
            f"data.path={woof / 'train'}",
            f"train.epochs={args.epochs}",
            f"train.output_dir={runs}",
            f"train.run_name={name}",
        ],
    )
    assert code == 0
    return runs / name


def embed_throughput(run: Path, source: Path, repeats: int, tmp: Path, overrides: tuple[str, ...] = ()) -> dict:
    """images/s of embed (to Parquet) and of evaluate's extraction, interleaved, medians; each
    timing includes resolving and opening the source, as the commands do."""
    model = load_model(run, overrides)
    cfg, embedder = model.cfg, model.embedder()
    path = absolute_source(str(source))
    n = len(open_images(resolve_source(path, survey=False), cfg.data.size))
    embed_s, extract_s = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        resolved = resolve_source(path, survey=False)
        dataset = open_images(resolved, cfg.data.size, strict=True)  # as twinview embed opens it
        quiet(embed_images, model, embedder, resolved, dataset, tmp / f"{source.name}-{r}.parquet", progress=False)
        embed_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        embedder.features(open_images(resolve_source(path, survey=False), cfg.data.size))
        extract_s.append(time.perf_counter() - t0)
    return {
        "images": n,
        "image_size": cfg.data.size,
        "embed_images_per_s": n / statistics.median(embed_s),
        "evaluate_features_images_per_s": n / statistics.median(extract_s),
        "embed_vs_evaluate": statistics.median(extract_s) / statistics.median(embed_s),
        "embed_seconds": [round(s, 2) for s in embed_s],
        "evaluate_seconds": [round(s, 2) for s in extract_s],
    }


def plant(val: Path, out: Path, count: int = 100, seed: int = 0) -> dict[str, str]:
    """Copies ``val`` to ``out`` and adds ``count`` altered copies; returns copy name -> original."""
    shutil.copytree(val, out)
    originals = sorted(out.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    planted = {}
    for i, j in enumerate(rng.choice(len(originals), count, replace=False)):
        src = originals[int(j)]
        img = Image.open(src).convert("RGB")
        kind = ("crop", "jpeg", "flip")[i % 3]
        if kind == "crop":
            w, h = img.size
            cw, ch = int(w * 0.9), int(h * 0.9)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x, y, x + cw, y + ch))
        elif kind == "flip":
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70 if kind == "jpeg" else 90)
        copy = src.with_name(f"planted-{kind}-{i:03d}-{src.name}")
        copy.write_bytes(buf.getvalue())
        planted[str(copy)] = str(src)
    return planted


def duplicate_scores(run: Path, folder: Path, planted: dict[str, str]) -> dict:
    """Runs twinview evaluate --data, then recall / other pairs per threshold for both backbones."""
    t0 = time.perf_counter()
    assert (
        quiet(twinview, ["evaluate", str(run), "--data", str(folder), "--duplicate-threshold", str(THRESHOLDS[0])]) == 0
    )
    seconds = time.perf_counter() - t0
    result = json.loads((run / "eval.json").read_text())["label_free"]
    from twinview.evaluate.embedding_file import read_embedding_file, read_metadata
    from twinview.evaluate.features import state_checksum
    from twinview.evaluate.label_free import near_duplicates
    from twinview.evaluate.unlabelled import mirror_invariant

    trained_weights = state_checksum(load_model(run).backbone)
    truth = {frozenset(p) for p in planted.items()}
    embeddings = {}
    for file in sorted((run / "features").glob(f"{folder.name}-*.parquet")):
        meta = read_metadata(file)
        backbone = "pretrained" if meta["weights"] == trained_weights else "random_init"
        embeddings[backbone + ("_mirrored" if meta.get("mirrored") else "")] = read_embedding_file(file)
    names = embeddings["pretrained"].names
    compared = {
        "pretrained (as reported: mirror-invariant)": mirror_invariant(
            embeddings["pretrained"].embeddings, embeddings["pretrained_mirrored"].embeddings
        ),
        "pretrained, plain embedding": embeddings["pretrained"].embeddings,
        "random_init, plain embedding": embeddings["random_init"].embeddings,
    }
    scores = {}
    for name, features in compared.items():
        found = [(frozenset((names[p.a], names[p.b])), p.similarity) for p in near_duplicates(features, THRESHOLDS[0])]
        per = {}
        for t in THRESHOLDS:
            hits = {f for f, s in found if s >= t}
            kinds = {k: sum(1 for f in hits & truth if f"planted-{k}-" in "".join(f)) for k in ("crop", "jpeg", "flip")}
            per[str(t)] = {"planted_found": len(hits & truth), "other_pairs": len(hits - truth), **kinds}
        scores[name] = per
    with (run / "duplicates.csv").open() as f:
        rows_csv = list(csv.DictReader(f))
    others = [
        r for r in rows_csv if frozenset((r["path_a"], r["path_b"])) not in truth and float(r["similarity"]) >= 0.985
    ]
    return {
        "evaluate_seconds": seconds,
        "planted_found_and_other_pairs_per_threshold": scores,
        "other_pairs_at_0.985": [
            [Path(r["path_a"]).name, Path(r["path_b"]).name, float(r["similarity"]), r["exact"]] for r in others[:15]
        ],
        "effective_rank": {k: result[k]["diagnostics"]["effective_rank"] for k in ("pretrained", "random_init")},
        "alignment": {k: result[k]["diagnostics"]["alignment"] for k in ("pretrained", "random_init")},
        "nn_cosine_p50": {k: result[k]["diagnostics"]["nn_cosine"]["p50"] for k in ("pretrained", "random_init")},
        "clusters": result["clusters"]["k"],
        "report": str(run / "report.html"),
    }


def search_latency(run: Path, query: Path, tmp: Path) -> dict:
    """10 queries against 50,000 synthetic 512-d embeddings: search() medians, and the CLI end to end."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, 512, generator=g)
    names = [f"img/{i:06d}.jpg" for i in range(len(x))]
    out = {}
    for suffix in (".parquet", ".npy"):
        index = tmp / f"index{suffix}"
        parts = ((names[i : i + 4096], x[i : i + 4096].numpy(), None) for i in range(0, len(x), 4096))
        write_embedding_file(index, parts, 512, "float32", {}, len(x))
        queries = torch.randn(10, 512, generator=g)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            search(queries, index, k=10)
            times.append(time.perf_counter() - t0)
        out[f"search_10_queries_50k{suffix}_ms"] = 1000 * statistics.median(times)
    t0 = time.perf_counter()
    code = quiet(
        twinview,
        ["search", str(run), "--index", str(tmp / "index.parquet"), "--query", str(query), "--out", str(tmp / "s.png")],
    )
    out["cli_one_query_seconds"] = time.perf_counter() - t0  # model load + query embed + search + grid
    assert code == 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained run directory (default: pretrain one)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    archive = Path(os.environ.get("TWINVIEW_IMAGEWOOF", SHARED / "imagewoof-96.tar.gz"))
    if not archive.is_file():
        print(json.dumps({"skipped": f"Imagewoof-96 archive not found at {archive}"}))
        return
    woof = extract_archive(archive) / "imagewoof-96"
    run = pretrained_run(args, woof)
    result: dict = {"benchmark": "unlabelled", "machine": f"{host_kind()}, torch {torch.__version__}", "run": str(run)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        result["embed_imagewoof_val"] = embed_throughput(run, woof / "val", args.repeats, tmp)
        cifar = SHARED / "cifar10-jpeg.tar.gz"
        if cifar.is_file():
            result["embed_cifar10_test"] = embed_throughput(
                run, extract_archive(cifar) / "cifar10-jpeg" / "test", args.repeats, tmp, ("data.image_size=32",)
            )
        folder = tmp / "woof-val-planted"
        planted = plant(woof / "val", folder)
        result["duplicates"] = duplicate_scores(run, folder, planted)
        result["search"] = search_latency(run, next(iter(planted)), tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
