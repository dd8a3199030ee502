"""The prepared GPU check: one command that proves the GPU path and records its figures.

Parts, each in its own subprocess with its own time limit (a slow or crashing part cannot eat the
budget or take the others down), results in one JSON (``--out``) and a short table:

1. ``cuda_tests``: the CUDA-only tests (``pytest -m cuda``), outcome per test.
2. ``views``: images/s of two views per recipe at 224 px in bf16, twinview's ops vs
   ``augment.backend=kornia``, and the views' share of a ResNet-50 SimCLR step at batch 256.
3. ``train``: training images/s and peak memory: ResNet-18 CIFAR stem at 32 px, batch 512, bf16,
   channels-last, eager vs ``train.compile``; ResNet-50 at 224 px, batch 256.
4. ``data``: one CIFAR-10 epoch of batches from ``data.cache=device``, and JPEG decoding with
   ``data.decode=gpu`` (nvJPEG) against PIL in DataLoader workers, images/s.
5. ``run``: SimCLR ResNet-18 (CIFAR stem) on the CIFAR-10 train set for the epochs that fit the
   part's budget, kNN on the test set, and the projected time of 200 epochs.

``--dry-run`` runs every part at toy sizes on the CPU (CI runs it, so the script never rots).
CIFAR-10 is looked for in ``--data`` (default: ``.gpudata/`` in the repository, a folder git ignores,
for a machine without the shared data; then ``../shared/data``); parts that need it say so when it is
missing.

Usage: python bench/gpu_check.py [--dry-run] [--out gpu_check.json] [--parts views,train]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = {"cuda_tests": 90, "views": 75, "train": 150, "data": 60, "run": 180}  # < 8 minutes in all


def _importable() -> None:
    """The GPU image has no install of twinview: map the folders to the namespace, as pyproject does."""
    try:
        importlib.import_module("twinview.pretrain")
    except ModuleNotFoundError:
        tree = Path(tempfile.mkdtemp()) / "twinview"
        tree.mkdir()
        for name in ("pretrain", "augment", "evaluate", "configs"):
            (tree / name).symlink_to(REPO / name)
        sys.path.insert(0, str(tree.parent))
        # and for the subprocesses (the parts, pytest)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree.parent), os.environ.get("PYTHONPATH")]))


def _cifar_archive(data: Path | None) -> Path | None:
    for folder in [data] if data else [REPO / ".gpudata", REPO.parent / "shared" / "data"]:
        if folder is not None and (folder / "cifar10-jpeg.tar.gz").is_file():
            return folder / "cifar10-jpeg.tar.gz"
    return None


def _timed(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, synchronised."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- the parts: each returns a JSON-able dict --------------------------------------------------


def part_cuda_tests(dry: bool, out_dir: Path, data: Path | None) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    report = out_dir / "cuda_tests.xml"
    # only the files that hold CUDA tests: collecting the others would import what the GPU image
    # may lack (datasets, onnx)
    files = sorted(str(p) for p in (REPO / "tests").rglob("test_*.py") if "pytest.mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tests = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        tests[f"{case.get('classname')}::{case.get('name')}"] = outcome
    if not tests or done.returncode not in (0, 5) or "failure" in tests.values() or "error" in tests.values():
        raise RuntimeError(f"CUDA tests: exit {done.returncode}, {tests}\n{done.stdout[-1500:]}")
    return {"exit_code": done.returncode, "tests": tests, "tail": done.stdout[-1500:]}


def _setup(dry: bool) -> tuple[Any, Any, Any]:
    import torch

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    return torch, device, dtype


def part_views(dry: bool, out_dir: Path, data: Path | None) -> dict[str, Any]:
    from twinview.augment.config import RECIPES
    from twinview.augment.views import build_views
    from twinview.pretrain.config import load_config

    torch, device, dtype = _setup(dry)
    size, batch, repeats = (32, 8, 2) if dry else (224, 256, 10)
    images = torch.randint(0, 256, (batch, 3, size + size // 7, size + size // 7), dtype=torch.uint8, device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    result: dict[str, Any] = {"size": size, "batch": batch, "dtype": str(dtype), "recipes": {}}
    for recipe in RECIPES:
        row = {}
        for backend in ("fast", "kornia"):
            cfg = load_config(None, ["data.path=x", f"augment.recipe={recipe}", f"augment.backend={backend}"]).augment
            try:  # one failing backend or recipe must not lose the other figures
                views = build_views(cfg, size, mean, std, seed=0, device=device, dtype=dtype)
                row[f"{backend}_images_per_s"] = batch / _timed(lambda views=views: views(images), device, repeats)
            except Exception as err:
                row[f"{backend}_error"] = f"{type(err).__name__}: {err}"[:500]
        if "fast_images_per_s" in row and "kornia_images_per_s" in row:
            row["fast_vs_kornia"] = row["fast_images_per_s"] / row["kornia_images_per_s"]
        result["recipes"][recipe] = row
    # the views' share of a SimCLR step: ResNet-50 at 224 px, batch 256
    from simclr_step import simclr_step  # bench/ is on the path of a bench script

    step = simclr_step([f"model.backbone={'resnet18' if dry else 'resnet50'}"], device, batch, size, dtype)
    cfg = load_config(None, ["data.path=x", "augment.recipe=simclr"]).augment
    views = build_views(cfg, size, mean, std, seed=0, device=device, dtype=dtype)
    view_s = _timed(lambda: views(images), device, repeats)
    step_s = _timed(step, device, repeats)
    result["resnet50_step"] = {
        "views_ms": 1000 * view_s,
        "step_ms": 1000 * step_s,
        "views_share": view_s / (view_s + step_s),
    }
    return result


def part_train(dry: bool, out_dir: Path, data: Path | None) -> dict[str, Any]:
    from simclr_step import simclr_step

    torch, device, dtype = _setup(dry)
    tiny = ("model.kwargs.depth=1", "model.kwargs.img_size=16", "model.kwargs.patch_size=8")
    configs = {  # name: backbone, size, batch, cifar stem, compile, extra overrides
        "resnet18_cifar_32px_eager": ("resnet18", 32, 512, True, False, ()),
        "resnet18_cifar_32px_compiled": ("resnet18", 32, 512, True, True, ()),
        "resnet50_224px_eager": ("resnet50", 224, 256, False, False, ()),
    }
    if dry:  # toy sizes; a one-block ViT stands in for the compiled model (fast to compile on a CPU)
        configs = {
            name: ("vit_tiny_patch16_224" if c else "resnet18", 16, 8, not c, c, tiny if c else ())
            for name, (_, _, _, _, c, _) in configs.items()
        }
    result: dict[str, Any] = {"dtype": str(dtype)}
    for name, (backbone, size, batch, stem, compile, extra) in configs.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:  # one failing configuration (a compile error, say) must not lose the others
            start = time.perf_counter()
            overrides = [f"model.backbone={backbone}", f"model.cifar_stem={stem}", *extra]
            step = simclr_step(overrides, device, batch, size, dtype, compile)
            step()  # compiles when asked
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            seconds = _timed(step, device, 2 if dry else 10)
        except Exception as err:
            result[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        result[name] = {
            "batch": batch,
            "size": size,
            "images_per_s": batch / seconds,
            "step_ms": 1000 * seconds,
            "first_step_s": first_s,
            "peak_memory_gb": peak,
        }
        del step
    rows = [result[f"resnet18_cifar_32px_{m}"] for m in ("eager", "compiled")]
    if all("images_per_s" in r for r in rows):
        result["compile_speedup"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return result


def _cifar(dry: bool, data: Path | None, tmp: Path) -> Path:
    """The CIFAR-10 root (``train/``, ``test/``); in a dry run a small labelled folder made here."""
    if dry:
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_image_folder

        for split in ("train", "test"):
            make_image_folder(tmp / "cifar" / split, classes=3, per_class=12, size=32, seed=len(split))
        return tmp / "cifar"
    archive = _cifar_archive(data)
    if archive is None:
        raise FileNotFoundError("cifar10-jpeg.tar.gz not found: copy it into .gpudata/ or pass --data DIR")
    from twinview.pretrain.data.builtin import extract_archive

    return extract_archive(archive) / "cifar10-jpeg"


def part_data(dry: bool, out_dir: Path, data: Path | None) -> dict[str, Any]:
    from accelerate import Accelerator

    from twinview.pretrain.config import load_config
    from twinview.pretrain.data.folder import SkipLog
    from twinview.pretrain.data.loaders import build_batches
    from twinview.pretrain.data.source import resolve_source

    torch, device, _ = _setup(dry)
    with tempfile.TemporaryDirectory() as tmp:
        root = _cifar(dry, data, Path(tmp))
        cfg = load_config(
            "simclr-cifar10",
            [
                f"data.path={root / 'train'}",
                "data.cache=device",
                f"train.batch_size={8 if dry else 512}",
                f"train.cpu={dry}",
                f"train.output_dir={tmp}",
            ],
        )
        accelerator = Accelerator(cpu=dry)
        start = time.perf_counter()
        source = resolve_source(cfg.data.path, survey=False)  # the folder scan counts, as in a run's start
        batches = build_batches(cfg, source, accelerator, SkipLog(Path(tmp) / "skipped"))
        batches.prepare(accelerator)
        build_s = time.perf_counter() - start
        result: dict[str, Any] = {"cache_build_s": build_s, "epochs": {}}
        for epoch in range(2):  # the second epoch is the steady state
            batches.set_epoch(epoch)
            start, images = time.perf_counter(), 0
            for x, _ in batches:
                images += x.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            result["epochs"][epoch] = {"images": images, "images_per_s": images / (time.perf_counter() - start)}
        # JPEG decoding: PIL in the workers vs nvJPEG on the device, the first batches of an epoch
        workers, limit = (1, 1) if dry else (min(8, os.cpu_count() or 1), 100)
        result["decode"] = {"workers": workers}
        for decode in ("cpu", "gpu"):
            try:  # a failure here must not lose the cache figures
                result["decode"][f"{decode}_images_per_s"] = _decode_rate(
                    root / "train", decode, workers, 8 if dry else 256, limit, dry, accelerator, Path(tmp)
                )
            except Exception as err:
                result["decode"][f"{decode}_error"] = f"{type(err).__name__}: {err}"[:500]
        if "cpu_images_per_s" in result["decode"] and "gpu_images_per_s" in result["decode"]:
            result["decode"]["gpu_vs_cpu"] = result["decode"]["gpu_images_per_s"] / result["decode"]["cpu_images_per_s"]
    return result


def _decode_rate(
    folder: Path, decode: str, workers: int, batch: int, limit: int, dry: bool, accelerator: Any, tmp: Path
) -> float:
    """Images/s of batches decoded with ``data.decode``, timed after 3 warm-up batches (worker
    start-up, nvJPEG initialisation). CIFAR-10's 32 px JPEGs measure the per-image cost, not the
    resize."""
    import torch

    from twinview.pretrain.config import load_config
    from twinview.pretrain.data.folder import SkipLog
    from twinview.pretrain.data.loaders import build_batches
    from twinview.pretrain.data.source import resolve_source

    cfg = load_config(
        "simclr-cifar10",
        [
            f"data.path={folder}",
            f"data.decode={decode}",
            f"data.num_workers={workers}",
            f"train.batch_size={batch}",
            f"train.cpu={dry}",
        ],
    )
    batches = build_batches(cfg, resolve_source(cfg.data.path, survey=False), accelerator, SkipLog(tmp / "skipped"))
    try:
        batches.prepare(accelerator).set_epoch(0)
        images, start = 0, 0.0
        for i, (x, _) in enumerate(batches):
            if i >= 3:
                images += x.shape[0]
            if i == 2:  # the clock starts once the third batch is here
                if x.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            if i + 1 == limit + 3:
                break
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)
    finally:
        # Stop the loader's workers now, even after an error. They ignore SIGTERM (worker_init): a
        # loader still alive at exit hangs the process in multiprocessing's exit join, and one freed
        # by the garbage collector does not stop them. The accelerator keeps every loader it
        # prepared, and the first import of torchvision (by the nvJPEG decoder) can keep this call's
        # frames, with their locals, in a reference cycle.
        del batches
        accelerator.free_memory()  # collects that cycle, then drops the accelerator's loaders


def part_run(dry: bool, out_dir: Path, data: Path | None) -> dict[str, Any]:
    from twinview.evaluate.run import evaluate
    from twinview.pretrain.app.evaluation import labelled_pair
    from twinview.pretrain.app.model import load_model
    from twinview.pretrain.config import load_config
    from twinview.pretrain.engine.train import train

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = _cifar(dry, data, Path(tmp))
        common = [
            f"data.path={root / 'train'}",
            "model.cifar_stem=true",
            f"train.output_dir={tmp}",
            "train.checkpoint_every=1000",
            "data.cache=device",
            f"train.cpu={dry}",
        ]
        common += (
            ["train.batch_size=8", "train.max_steps_per_epoch=2"]
            if dry
            else ["train.batch_size=512", "train.mixed_precision=bf16", "data.num_workers=8"]
        )
        probe = load_config("simclr-cifar10", [*common, "train.epochs=1", "train.run_name=probe"])
        with contextlib.redirect_stdout(sys.stderr):
            train(probe, Path(tmp) / "probe")  # builds the cache and measures an epoch
        probe_records = map(json.loads, (Path(tmp) / "probe" / "metrics.jsonl").read_text().splitlines())
        epoch_s = next(r for r in probe_records if r["kind"] == "epoch")["seconds"]
        # the part's limit, less what is used so far and ~35 s for the run's start-up and the kNN
        budget = 3 if dry else BUDGET_S["run"] - (time.perf_counter() - began) - 35
        epochs = max(1, min(200, int(budget / epoch_s)))
        cfg = load_config("simclr-cifar10", [*common, f"train.epochs={epochs}", "train.run_name=run"])
        with contextlib.redirect_stdout(sys.stderr):
            train(cfg, Path(tmp) / "run")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in records if r["kind"] == "epoch"]
        model = load_model(Path(tmp) / "run")
        reference, query = labelled_pair(str(root / "train"), str(root / "test"), model.cfg.data.size)
        knn = evaluate(model.embedder(), reference, query, cfg.eval, cfg.augment, seed=cfg.train.seed).knn
    return {
        "epochs": epochs,
        "seconds_per_epoch_median": statistics.median(seconds),
        "knn_top1": knn.top1,
        "knn_top5": knn.top5,
        "projected_200_epochs_min": 200 * statistics.median(seconds) / 60,
        "goal": "200 epochs to kNN >= 0.85 in <= 8 minutes on one H100",
    }


PARTS: dict[str, Callable[[bool, Path, Path | None], dict[str, Any]]] = {
    "cuda_tests": part_cuda_tests,
    "views": part_views,
    "train": part_train,
    "data": part_data,
    "run": part_run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--data", type=Path, default=None, help="folder holding cifar10-jpeg.tar.gz")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # run one part (the subprocess)
    args = parser.parse_args()
    _importable()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.part:
        print(json.dumps(PARTS[args.part](args.dry_run, args.out.parent, args.data)))
        return
    results: dict[str, Any] = {"dry_run": args.dry_run, "parts": {}}
    for name in args.parts.split(","):
        budget = BUDGET_S[name] * (3 if args.dry_run else 1)  # a 2-core CPU is slow even at toy sizes
        cmd = [sys.executable, __file__, "--part", name, "--out", str(args.out)]
        cmd += ["--dry-run"] if args.dry_run else []
        cmd += ["--data", str(args.data)] if args.data else []
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=budget, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            lines = done.stdout.strip().splitlines()
            ok = done.returncode == 0 and bool(lines)
            part = json.loads(lines[-1]) if ok else {"error": done.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            ok, part = False, {"error": f"stopped at its limit of {budget} s"}
        part["ok"], part["seconds"] = ok, time.perf_counter() - start
        results["parts"][name] = part
        args.out.write_text(json.dumps(results, indent=2))  # what is done so far survives a later crash
        print(f"{name:<11} {'ok' if ok else 'FAILED':<7} {part['seconds']:6.1f} s", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if not all(p["ok"] for p in results["parts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
