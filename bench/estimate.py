"""How well the start of a run predicts the cheaper choices it names on a CPU.

A run whose estimate is long on a CPU names a smaller ``data.image_size`` and the photo recipe with
estimates scaled by the views' area (``twinview.pretrain.engine.run_start.cheaper_choices``). This
trains a few steps of each on the same photos, times the steps after the first, and compares each
choice's time per image with the area-scaled prediction from the default run.

The photos are Imagewoof images upscaled to a shorter side of 256 px (``--size``), so the default
run picks 224 px as it would for a folder of camera photos.

Usage: python bench/estimate.py --data /tmp/imagewoof-96/train [--images 1536] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from PIL import Image

from twinview.pretrain.config import load_config
from twinview.pretrain.engine.run_start import cheaper_choices
from twinview.pretrain.engine.train import train


def photo_folder(source: Path, out: Path, images: int, side: int) -> Path:
    """The first ``images`` files of ``source`` (sorted), resized to a shorter side of ``side`` px."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:images]
    for f in files:
        target = out / f.parent.name / f"{f.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as img:
            scale = side / min(img.size)
            img.convert("RGB").resize((round(img.width * scale), round(img.height * scale))).save(target, quality=90)
    return out


def seconds_per_image(recipe: str | None, overrides: list[str], runs: Path, name: str) -> tuple[float, int]:
    """Median seconds per image over the logged steps after the first, and the view side."""
    cfg = load_config(recipe, [*overrides, f"train.output_dir={runs}", f"train.run_name={name}"])
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg, runs / name, recipe=recipe or "")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    saved = load_config(runs / name / "config.yaml")
    rates = [r["images_per_s"] for r in records if r["kind"] == "step" and r["step"] > 1]
    return 1.0 / statistics.median(rates), saved.augment.crop_size or int(saved.data.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of photos, e.g. imagewoof-96/train")
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--size", type=int, default=256, help="shorter side the photos are resized to")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photos = photo_folder(Path(args.data), Path(tmp) / "photos", args.images, args.size)
        common = [
            f"data.path={photos}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.steps}",
            "train.log_every=1",
        ]
        runs = Path(tmp) / "runs"
        base, view = seconds_per_image(None, common, runs, "default")
        cfg = load_config(None, [*common, f"data.image_size={view}"])
        out: dict = {"bench": "estimate", "photos": args.images, "side": args.size, "default": {"view": view}}
        out["default"]["ms_per_image"] = 1000 * base
        for choice, ratio, _ in cheaper_choices(cfg, ""):
            if choice.startswith("--config"):
                recipe, extra = choice.split()[1], common
            else:
                recipe, extra = None, [*common, choice]
            measured, side = seconds_per_image(recipe, extra, runs, choice.replace("=", "-").replace(" ", "-"))
            out[choice] = {
                "view": side,
                "ms_per_image": 1000 * measured,
                "predicted_ms_per_image": 1000 * base * ratio,
                "measured_over_predicted": measured / (base * ratio),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
