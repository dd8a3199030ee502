"""Near-duplicates by rule: planted copies of each kind found by perceptual hashes, by the cosine
threshold and by the relative rule, for a briefly and a longer trained model.

Imagewoof-96 ``val`` (3,929 photos, ``../shared/data/imagewoof-96.tar.gz``) copied to a folder, plus
``--count`` altered copies of distinct photos per kind:

* ``mirror``: flipped left-right;
* ``jpeg``: re-encoded at JPEG quality 70;
* ``border``: a thin border cropped (2.5 % of each side: under 10 % of the area) and resized back;
* ``crop90``: a crop of 90 % of each side at a random place (19 % of the area gone), not resized;
* ``half``: resized to half the side.

Then ``twinview evaluate RUN --data FOLDER --out OUT`` per run, as a user runs it, and from its
``duplicates.csv``: per kind, how many planted pairs each rule found and how many any rule found;
and the other pairs each rule reported (Imagewoof has near-duplicates of its own, so "other" is
not all false). Prints one JSON object.

Usage: python bench/duplicates.py --runs SHORT_RUN,LONG_RUN [--count 30]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from host import host_kind
from PIL import Image

from twinview.pretrain.app.cli import main as twinview
from twinview.pretrain.data.builtin import extract_archive

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KINDS = ("mirror", "jpeg", "border", "crop90", "half")
RULES = ("hash", "cosine", "relative")


def altered(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """The copy of one kind, and its JPEG quality."""
    w, h = img.size
    if kind == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 90
    if kind == "jpeg":
        return img, 70
    if kind == "border":
        dx, dy = max(1, round(0.025 * w)), max(1, round(0.025 * h))
        return img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BICUBIC), 90
    if kind == "crop90":
        cw, ch = int(w * 0.9), int(h * 0.9)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)), 90
    assert kind == "half"
    return img.resize((w // 2, h // 2), Image.Resampling.BICUBIC), 90


def plant(val: Path, out: Path, count: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Copies ``val`` to ``out`` and adds ``count`` copies per kind (distinct originals); returns
    copy path -> (original path, kind)."""
    shutil.copytree(val, out)
    originals = sorted(out.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(originals), count * len(KINDS), replace=False)
    planted = {}
    for i, j in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        src = originals[int(j)]
        img, quality = altered(Image.open(src).convert("RGB"), kind, rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        copy = src.with_name(f"planted-{kind}-{i:03d}-{src.name}")
        copy.write_bytes(buf.getvalue())
        planted[str(copy)] = (str(src), kind)
    return planted


def scores(run: Path, folder: Path, planted: dict[str, tuple[str, str]], out: Path) -> dict:
    """``twinview evaluate RUN --data FOLDER``, then the planted pairs found per kind and rule."""
    start = time.perf_counter()
    assert twinview(["evaluate", str(run), "--data", str(folder), "--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    with (out / "duplicates.csv").open() as f:
        rows = list(csv.DictReader(f))
    truth = {frozenset((copy, original)): kind for copy, (original, kind) in planted.items()}
    per_kind = {
        k: {"planted": sum(v == k for v in truth.values()), "any_rule": 0, **dict.fromkeys(RULES, 0)} for k in KINDS
    }
    other = {"any_rule": 0, **dict.fromkeys(RULES, 0)}
    for r in rows:
        rules = r["rule"].split("+")
        kind = truth.get(frozenset((r["path_a"], r["path_b"])))
        bucket = per_kind[kind] if kind else other
        bucket["any_rule"] += 1
        for rule in rules:
            bucket[rule] += 1
    epochs = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).get("epoch")
    return {
        "run": str(run),
        "epochs": epochs,
        "evaluate_seconds": round(seconds, 1),
        "planted": per_kind,
        "other_pairs": other,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated run directories (e.g. short,long)")
    parser.add_argument("--count", type=int, default=30, help="copies per kind")
    args = parser.parse_args()
    archive = Path(os.environ.get("TWINVIEW_IMAGEWOOF", SHARED / "imagewoof-96.tar.gz"))
    if not archive.is_file():
        print(json.dumps({"skipped": f"Imagewoof-96 archive not found at {archive}"}))
        return
    val = extract_archive(archive) / "imagewoof-96" / "val"
    result: dict = {"benchmark": "duplicates", "host": host_kind(), "count_per_kind": args.count, "runs": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "woof-val-planted"
        planted = plant(val, folder, args.count)
        for i, run in enumerate(args.runs.split(",")):
            result["runs"].append(scores(Path(run), folder, planted, tmp / f"eval-{i}"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
