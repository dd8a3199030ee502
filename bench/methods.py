"""Every self-supervised objective on both CPU protocols, twinview and lightly side by side, in one table.

For each protocol and method, twinview trains its shipped recipe ``<method>-cifar10`` or
``<method>-photos`` (names with dashes) through the code path of ``bench/cifar10_quick.py`` /
``bench/imagewoof_quick.py`` (``train`` on the recipe, then the saved model's backbone scored), then
lightly trains its implementation of the same method (``bench/peer_methods.py``, whose docstring
lists, per method, lightly's settings used and where they come from) on the same images, with the
same backbone (the recipe's ``model`` section: timm ResNet-18, its stem as the recipe has it), batch
256, 2 DataLoader workers, the same epochs, and the same precision (CPU bf16 autocast where the recipe's
``train.mixed_precision`` gives bf16 on this host; ``--peer-precision fp32`` keeps lightly in fp32).
Both backbones are then scored by the same frozen-feature code: kNN (k=200, T=0.1) and a linear
probe, of the protocol's held-out set against its training images.

Protocols:

- ``cifar10``: the CIFAR-10 quick protocol: the first 1,000 training images of each class (10,000,
  32 px), scored on the 10,000 test images. lightly's views at 32 px.
- ``imagewoof``: Imagewoof-96: 9,025 ``train`` images loaded at 96 px, 64 px crops, scored on the
  3,929 ``val`` images at 96 px. lightly's views at 64 px (its global crops; DINO's local crops at
  96/224 of that).

Each run is its own process (twinview's with this Python, lightly's with ``.venv-peer``'s, which has
lightly; see ``bench/peer_lightly.py``), so each run's peak memory is its own: ``peak_rss_mb`` is the
training process's maximum resident set at the end of training (before the scoring),
``peak_rss_mb_process_tree`` the largest of that process and its DataLoader workers over the whole
run, scoring included. Seconds per epoch are the median over epochs; an epoch's time excludes the kNN
monitor (``--monitor``: kNN on the held-out set after every epoch, both libraries, for
time-to-accuracy curves from ``epoch_end_train_seconds`` and ``knn_per_epoch``).

A method with no twinview recipe is skipped with the reason in the table; MoCo v3 without
``moco-v3-<protocol>`` recipes runs ``moco-v2-<protocol>`` with ``objective.name=moco_v3
augment.recipe=moco_v3``. lightly has no MoCo v3, so that row has no ratio.

Output: one JSON record per run (one library, one method, one protocol) appended to ``--out`` as it
finishes (``--resume-from`` skips the runs a file already has), the table as JSON on stdout and as
markdown in ``--markdown``; progress on stderr. Ratios are twinview / lightly, from runs of one
invocation on one host kind.

Best against best (the longer photo runs): ``--methods moco_v2 --peer-method simclr`` pairs
twinview's MoCo v2 with lightly's SimCLR in one row, and ``--monitor --monitor-every 3`` records
both kNN curves; the row's notes then give each side's training time to the other's final kNN.

Usage: python bench/methods.py [--protocols cifar10,imagewoof] [--methods simclr,moco_v2,...]
    [--epochs 10] [--peer | --no-peer] [--peer-method NAME] [--monitor [--monitor-every N]]
    [--out runs.jsonl] [--resume-from runs.jsonl] [--markdown table.md] [--cifar10 ARCHIVE_OR_DIR]
    [--imagewoof ARCHIVE_OR_DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO / ".." / "shared" / "data"
METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "dino")
PER_CLASS, WORKERS = 1000, 2


@dataclass(frozen=True)
class Protocol:
    """Where a protocol's images are and what its recipes are called."""

    name: str
    suffix: str  # recipe name suffix: <method>-<suffix>
    env: str  # environment variable with the archive or folder
    archive: Path
    inner: str  # the folder inside the archive
    query: str  # the held-out split scored against the training images


PROTOCOLS = {
    "cifar10": Protocol(
        "cifar10", "cifar10", "TWINVIEW_CIFAR10", SHARED / "cifar10-jpeg.tar.gz", "cifar10-jpeg", "test"
    ),
    "imagewoof": Protocol(
        "imagewoof", "photos", "TWINVIEW_IMAGEWOOF", SHARED / "imagewoof-96.tar.gz", "imagewoof-96", "val"
    ),
}


def _mb(kilobytes: int) -> float:
    return round(kilobytes / 1024, 1)  # ru_maxrss is in KiB on Linux


# --- data ---------------------------------------------------------------------------------------


def data_dirs(protocol: Protocol, source: Path) -> tuple[Path, Path]:
    """The training folder and the held-out folder of a protocol, from its archive (extracted into
    the cache once, as the quick-protocol scripts do) or an extracted folder."""
    from twinview.pretrain.data.builtin import cache_dir, extract_archive

    root = source if source.is_dir() else extract_archive(source) / protocol.inner
    if protocol.name != "cifar10":
        return root / "train", root / protocol.query
    if not source.is_dir():
        from cifar10_quick import quick_subset  # the quick protocol's own subset folder

        return quick_subset(root, PER_CLASS), root / protocol.query
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    target = cache_dir() / f"cifar10-quick-{PER_CLASS}-{digest}"
    if not (target / ".complete").is_file():  # the same images as quick_subset, from this folder
        for class_dir in sorted((root / "train").iterdir()):
            out = target / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:PER_CLASS]:
                if not (out / f.name).exists():
                    (out / f.name).symlink_to(f.resolve())
        (target / ".complete").touch()
    return target, root / protocol.query


def twinview_recipe(method: str, protocol: Protocol) -> tuple[str | None, list[str], str]:
    """The twinview recipe of a method on a protocol, the overrides it needs, and a note (or, with
    no recipe, None and the reason)."""
    from twinview.pretrain.config import shipped_recipes

    name = f"{method.replace('_', '-')}-{protocol.suffix}"
    shipped = shipped_recipes()
    if name in shipped:
        return name, [], ""
    base = f"moco-v2-{protocol.suffix}"
    if method == "moco_v3" and base in shipped:
        overrides = ["objective.name=moco_v3", "augment.recipe=moco_v3"]
        return base, overrides, f"no {name} recipe: {base} with {' '.join(overrides)}"
    return None, [], f"no twinview recipe {name}"


# --- the runs (child processes) -----------------------------------------------------------------


def _host() -> str:
    from host import host_kind

    return host_kind()


def _scores(result: Any) -> dict[str, Any]:
    return {
        "knn_top1": result.knn.top1,
        "knn_top5": result.knn.top5,
        "probe_top1": result.linear_probe.top1 if result.linear_probe is not None else None,
    }


def _epochs_summary(seconds: list[float], knn: list[float | None], losses: list[float | None]) -> dict[str, Any]:
    elapsed = [round(sum(seconds[: i + 1]), 2) for i in range(len(seconds))]
    return {
        "seconds_per_epoch_median": statistics.median(seconds),
        "seconds_per_epoch": [round(s, 2) for s in seconds],
        "epoch_end_train_seconds": elapsed,
        "loss_per_epoch": losses,
        **({"knn_per_epoch": knn} if any(k is not None for k in knn) else {}),
    }


def run_twinview(args: argparse.Namespace) -> dict[str, Any]:
    """twinview's run, as bench/cifar10_quick.py / imagewoof_quick.py make it (plus the probe)."""
    import torch

    from twinview.evaluate.run import evaluate
    from twinview.pretrain.app.evaluation import labelled_pair
    from twinview.pretrain.app.model import load_model
    from twinview.pretrain.config import load_config
    from twinview.pretrain.engine.train import train

    protocol = PROTOCOLS[args.protocol]
    train_dir, query_dir = data_dirs(protocol, args.data)
    extra = [f"train.max_steps_per_epoch={args.max_steps}"] if args.max_steps else []
    if args.monitor:
        extra += [f"eval.monitor_every={args.monitor_every}", f"eval.monitor_train={train_dir}"]
        extra += [f"eval.monitor_test={query_dir}"]
    cfg = load_config(
        args.recipe,
        [
            f"data.path={train_dir}",
            f"train.epochs={args.epochs}",
            f"train.output_dir={args.output_dir}",
            f"train.run_name=methods-{args.protocol}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}",
            "train.checkpoint_every=1000",
            *extra,
            *args.override,
        ],
    )
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    train(cfg, run_dir, recipe=args.recipe)
    train_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in records if e["kind"] == "epoch"]
    model = load_model(run_dir)
    cfg = model.cfg  # the saved config: image size and precision resolved
    reference, query = labelled_pair(str(train_dir), str(query_dir), cfg.data.size)
    t0 = time.perf_counter()
    result = evaluate(model.embedder(), reference, query, cfg.eval, cfg.augment, probe=True, seed=cfg.train.seed)
    return {
        "library": "twinview",
        "recipe": args.recipe,
        "overrides": args.override,
        "objective": cfg.objective.name,
        "backbone": cfg.model.backbone,
        "cifar_stem": cfg.model.cifar_stem,
        "image_size": cfg.data.size,
        "crop_size": cfg.augment.crop_size or cfg.data.size,
        "local_crops": cfg.augment.local_crops,
        "batch_size": cfg.train.batch_size,
        "precision": cfg.train.mixed_precision,
        "steps_per_epoch": epochs[0]["step"] if epochs else None,
        **_epochs_summary(
            [e["seconds"] for e in epochs], [e.get("knn_top1") for e in epochs], [e["loss"] for e in epochs]
        ),
        **({"view_side_per_epoch": [e["view_side"] for e in epochs]} if epochs and "view_side" in epochs[0] else {}),
        "train_seconds": train_seconds,
        "peak_rss_mb": _mb(peak),
        **_scores(result),
        "eval_seconds": time.perf_counter() - t0,
        "train_images": result.knn.num_reference,
        "run_dir": str(run_dir),
        "torch": torch.__version__,
    }


def run_lightly(args: argparse.Namespace) -> dict[str, Any]:
    """lightly's run of the same method on the same data, backbone, epochs and precision."""
    import lightly
    import torch
    from peer_methods import Setup, train_lightly

    from twinview.evaluate.features import Embedder
    from twinview.evaluate.run import default_device, evaluate, knn_only
    from twinview.pretrain.app.evaluation import labelled_pair
    from twinview.pretrain.config import load_config
    from twinview.pretrain.distributed import cpu_computes_bf16
    from twinview.pretrain.models import create_backbone, normalization_stats

    protocol = PROTOCOLS[args.protocol]
    train_dir, query_dir = data_dirs(protocol, args.data)
    cfg = load_config(args.recipe, [f"data.path={train_dir}", *args.override])
    size = cfg.data.size
    precision = cfg.train.mixed_precision
    bf16 = precision == "bf16" or (precision == "auto" and cpu_computes_bf16() and not torch.cuda.is_available())
    bf16 = bf16 and args.peer_precision == "match"
    reference, query = labelled_pair(str(train_dir), str(query_dir), size)

    def embedder(backbone: torch.nn.Module) -> Embedder:
        mean, std = normalization_stats(backbone)
        return Embedder(backbone, mean, std, cfg.eval.batch_size, WORKERS, default_device())

    def monitor(epoch: int, backbone: torch.nn.Module) -> dict[str, Any]:
        if not args.monitor or (epoch + 1) % args.monitor_every:
            return {}
        t0 = time.perf_counter()
        state = torch.get_rng_state()  # the monitor's loader draws from it: training's order stays the same
        knn = knn_only(embedder(backbone), reference, query, cfg.eval)
        torch.set_rng_state(state)
        print(f"monitor: kNN top-1 {knn.top1:.4f} top-5 {knn.top5:.4f}", file=sys.stderr)
        return {"knn_top1": knn.top1, "monitor_seconds": time.perf_counter() - t0}

    setup = Setup(
        train_dir,
        args.epochs,
        crop=cfg.augment.crop_size or size,
        small=size <= 32,
        backbone=lambda: create_backbone(cfg.model),
        local_crops=cfg.augment.local_crops,
        batch_size=cfg.train.batch_size,
        workers=WORKERS,
        bf16=bf16,
        max_steps=args.max_steps,
        seed=cfg.train.seed,
    )
    started = time.perf_counter()
    trained = train_lightly(args.method, setup, after_epoch=monitor)
    train_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = evaluate(
        embedder(trained.backbone), reference, query, cfg.eval, cfg.augment, probe=True, seed=cfg.train.seed
    )
    return {
        "library": f"lightly {lightly.__version__}",
        "recipe": f"lightly {args.method} (bench/peer_methods.py), model section of {args.recipe}",
        "backbone": cfg.model.backbone,
        "cifar_stem": cfg.model.cifar_stem,
        "image_size": size,
        "crop_size": setup.crop,
        "local_crops": setup.local_crops if args.method == "dino" else 0,
        "batch_size": setup.batch_size,
        "precision": "bf16" if bf16 else "no",
        **_epochs_summary(trained.seconds, [e.get("knn_top1") for e in trained.extra], trained.losses),
        "train_seconds": train_seconds,
        "peak_rss_mb": _mb(peak),
        **_scores(result),
        "eval_seconds": time.perf_counter() - t0,
        "train_images": result.knn.num_reference,
        "torch": torch.__version__,
    }


def child_main(args: argparse.Namespace) -> None:
    """One run in this process; its JSON record on stdout (everything else goes to stderr)."""
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        record = (run_twinview if args.child == "twinview" else run_lightly)(args)
    record["host"] = _host()
    print(json.dumps(record), file=stdout, flush=True)


# --- the driver ---------------------------------------------------------------------------------


def _spawn(command: list[str]) -> tuple[dict[str, Any] | None, float, float, str]:
    """Runs a child: its JSON record (None if it failed), wall seconds, the peak RSS of its process
    tree (MB) and the tail of its stderr (which is also passed through)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    tail: collections.deque[str] = collections.deque(maxlen=25)

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write("    " + line)
            sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    wall = time.perf_counter() - started
    record = None
    if proc.returncode == 0:
        with contextlib.suppress(json.JSONDecodeError, IndexError):
            record = json.loads(out.strip().splitlines()[-1])
    return record, wall, _mb(usage.ru_maxrss), "\n".join(tail)


def _load(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def time_to_reach(record: dict[str, Any], target: float) -> float | None:
    """Training seconds (the monitor excluded) until a run's monitored kNN first reaches ``target``;
    None if it never does or was not monitored."""
    for knn, seconds in zip(record.get("knn_per_epoch", []), record["epoch_end_train_seconds"], strict=True):
        if knn is not None and knn >= target:
            return float(seconds)
    return None


def time_to_accuracy(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any] | None:
    """Each side's training time to reach the other's final monitored kNN, and twinview's time to
    lightly's final kNN as a fraction of lightly's whole training time."""
    finals = [[k for k in r.get("knn_per_epoch", []) if k is not None] for r in (ours, theirs)]
    if not all(finals):
        return None
    to_theirs, to_ours = time_to_reach(ours, finals[1][-1]), time_to_reach(theirs, finals[0][-1])
    lightly_seconds = theirs["epoch_end_train_seconds"][-1]
    return {
        "twinview_final_knn": finals[0][-1],
        "lightly_final_knn": finals[1][-1],
        "twinview_seconds_to_lightly_final": to_theirs,
        "lightly_seconds_to_twinview_final": to_ours,
        "lightly_train_seconds": lightly_seconds,
        "twinview_train_seconds": ours["epoch_end_train_seconds"][-1],
        "time_ratio": _ratio(to_theirs, lightly_seconds),
    }


def build_rows(records: Iterable[dict[str, Any]], notes: dict[tuple[str, str], list[str]]) -> list[dict[str, Any]]:
    """One row per protocol and method: both libraries' records and the same-run ratios."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        latest[(r["protocol"], r["method"], r["side"])] = r
    keys = sorted(
        {(p, m) for p, m, _ in latest} | set(notes),
        key=lambda k: (list(PROTOCOLS).index(k[0]), METHODS.index(k[1]) if k[1] in METHODS else 99),
    )
    rows = []
    for protocol, method in keys:
        ours, theirs = latest.get((protocol, method, "twinview")), latest.get((protocol, method, "lightly"))
        row: dict[str, Any] = {"protocol": protocol, "method": method, "twinview": ours, "lightly": theirs}
        row_notes = list(notes.get((protocol, method), []))
        for side, r in (("twinview", ours), ("lightly", theirs)):
            if r is not None and r.get("error"):
                row_notes.append(f"{side} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
        ok = [r for r in (ours, theirs) if r is not None and not r.get("error")]
        row["host"] = " / ".join(sorted({r["host"] for r in ok})) or None
        if len(ok) == 2:
            a, b = ok  # twinview's, lightly's
            if a["host"] != b["host"] or a.get("invocation") != b.get("invocation"):
                row_notes.append("no ratio: the two runs come from different invocations or hosts")
            else:
                row["knn_ratio"] = _ratio(a["knn_top1"], b["knn_top1"])
                row["probe_ratio"] = _ratio(a["probe_top1"], b["probe_top1"])
                row["seconds_per_epoch_ratio"] = _ratio(a["seconds_per_epoch_median"], b["seconds_per_epoch_median"])
                row["time_to_accuracy"] = time_to_accuracy(a, b)
        row["notes"] = row_notes
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The table as markdown, with the notes below it."""
    cols = (
        "protocol | method | twinview recipe | kNN twinview | kNN lightly | kNN ratio | probe twinview | "
        "probe lightly | s/epoch twinview | s/epoch lightly | s/epoch ratio | peak MB twinview | "
        "peak MB lightly | precision | host"
    )
    lines = [header, "", f"| {cols} |", "|" + " --- |" * (cols.count("|") + 1)]
    notes = []
    for row in rows:
        ours = row["twinview"] if row["twinview"] and not row["twinview"].get("error") else {}
        theirs = row["lightly"] if row["lightly"] and not row["lightly"].get("error") else {}
        recipe = " ".join([ours.get("recipe", "-"), *ours.get("overrides", [])])
        precision = f"{ours.get('precision', '-')} / {theirs.get('precision', '-')}"
        cells = [
            row["protocol"],
            row["method"],
            f"`{recipe}`" if ours else "-",
            _fmt(ours.get("knn_top1")),
            _fmt(theirs.get("knn_top1")),
            _fmt(row.get("knn_ratio"), 2) + ("x" if row.get("knn_ratio") else ""),
            _fmt(ours.get("probe_top1")),
            _fmt(theirs.get("probe_top1")),
            _fmt(ours.get("seconds_per_epoch_median"), 1),
            _fmt(theirs.get("seconds_per_epoch_median"), 1),
            _fmt(row.get("seconds_per_epoch_ratio"), 2) + ("x" if row.get("seconds_per_epoch_ratio") else ""),
            _fmt(ours.get("peak_rss_mb"), 0),
            _fmt(theirs.get("peak_rss_mb"), 0),
            precision,
            row["host"] or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row['protocol']} {row['method']}: {n}" for n in row["notes"]]
        tta = row.get("time_to_accuracy")
        if tta:
            reach = tta["twinview_seconds_to_lightly_final"]
            notes.append(
                f"- {row['protocol']} {row['method']}: time to accuracy: twinview reached lightly's final kNN "
                f"({tta['lightly_final_knn']:.3f}) after "
                + (f"{reach:.0f} s, {tta['time_ratio']:.2f}x" if reach is not None else "never, against")
                + f" lightly's {tta['lightly_train_seconds']:.0f} s of training"
            )
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def driver_main(args: argparse.Namespace) -> None:
    protocols = [p for p in args.protocols.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    for name, known in ((protocols, PROTOCOLS), (methods, METHODS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            sys.exit(f"unknown: {', '.join(unknown)} (choose from {', '.join(known)})")
    from peer_methods import MISSING

    invocation = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    records = _load(args.resume_from)
    finished: dict[tuple[Any, ...], set[str]] = collections.defaultdict(set)  # sides done per invocation
    for r in records:
        if not r.get("error"):
            finished[(r["protocol"], r["method"], r.get("epochs"), r.get("max_steps"), r["invocation"])].add(r["side"])
    notes: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    peer_python = args.peer_python
    if args.peer and not Path(peer_python).is_file():
        sys.exit(f"lightly's environment is missing ({peer_python}): see bench/peer_lightly.py, or pass --no-peer")
    for protocol_name in protocols:
        protocol = PROTOCOLS[protocol_name]
        source = Path(getattr(args, protocol_name) or os.environ.get(protocol.env, "") or protocol.archive)
        if not source.exists():
            for method in methods:
                notes[(protocol_name, method)].append(f"skipped: no data at {source}")
            continue
        for method in methods:
            recipe, overrides, note = twinview_recipe(method, protocol)
            if note:
                notes[(protocol_name, method)].append(note)
            if recipe is None:
                continue
            sides = ["twinview"] + (["lightly"] if args.peer else [])
            peer_method = args.peer_method or method
            if args.peer and peer_method in MISSING:
                notes[(protocol_name, method)].append(f"no ratio: {MISSING[peer_method]}")
                sides.remove("lightly")
            elif args.peer and peer_method != method:
                notes[(protocol_name, method)].append(f"lightly's {peer_method} against twinview's {method}")
            if any(
                key[:4] == (protocol_name, method, args.epochs, args.max_steps) and set(sides) <= done
                for key, done in finished.items()
            ):  # a pair is only taken whole from one invocation, so that its ratio is a same-run one
                print(f"[methods] {protocol_name} {method}: already in {args.resume_from}", file=sys.stderr)
                continue
            for side in sides:
                python = sys.executable if side == "twinview" else peer_python
                command = [python, str(Path(__file__).resolve()), "--child", side, "--protocol", protocol_name]
                command += ["--method", method if side == "twinview" else peer_method, "--recipe", recipe]
                command += ["--epochs", str(args.epochs), "--monitor-every", str(args.monitor_every)]
                command += ["--data", str(source), "--max-steps", str(args.max_steps), "--output-dir", args.output_dir]
                command += ["--peer-precision", args.peer_precision] + (["--monitor"] if args.monitor else [])
                command += [f"--override={o}" for o in overrides]
                print(f"[methods] {protocol_name} {method} {side}: {recipe} {' '.join(overrides)}", file=sys.stderr)
                record, wall, tree_peak, tail = _spawn(command)
                base = {
                    "protocol": protocol_name,
                    "method": method,
                    "side": side,
                    "epochs": args.epochs,
                    "max_steps": args.max_steps,
                    "monitor": args.monitor,
                    **({"peer_method": peer_method} if side == "lightly" and peer_method != method else {}),
                    "invocation": invocation,
                    "wall_seconds": round(wall, 1),
                    "peak_rss_mb_process_tree": tree_peak,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                record = {**base, **record} if record is not None else {**base, "error": tail or "failed"}
                records.append(record)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                summary = (
                    f"kNN {record['knn_top1']:.4f}, {record['seconds_per_epoch_median']:.1f} s/epoch"
                    if "error" not in record
                    else "FAILED"
                )
                print(f"[methods] {protocol_name} {method} {side}: {summary} ({wall:.0f} s)", file=sys.stderr)
    selected = [
        r
        for r in records
        if r["protocol"] in protocols
        and r["method"] in methods
        and (r.get("epochs"), r.get("max_steps")) == (args.epochs, args.max_steps)
    ]
    rows = build_rows(selected, notes)
    header = (
        f"`bench/methods.py`, {args.epochs} epoch(s)"
        + (f", at most {args.max_steps} steps per epoch (smoke test)" if args.max_steps else "")
        + f", {time.strftime('%Y-%m-%d')}; ratios twinview / lightly from the same invocation and host."
    )
    if args.markdown:
        args.markdown.write_text(markdown(rows, header))
    print(json.dumps({"benchmark": "methods", "epochs": args.epochs, "rows": rows}, indent=2))


def main() -> None:
    from twinview.pretrain.data.builtin import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default="cifar10,imagewoof", help="comma-separated: cifar10, imagewoof")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated registry names")
    parser.add_argument("--epochs", type=int, default=10, help="for both libraries and every method")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run lightly")
    parser.add_argument("--monitor", action="store_true", help="kNN during training (time-to-accuracy curves)")
    parser.add_argument("--monitor-every", type=int, default=1, help="with --monitor: kNN every N epochs")
    parser.add_argument(
        "--peer-method", help="lightly runs this method instead of the same one (one method: best against best)"
    )
    parser.add_argument("--peer-precision", choices=("match", "fp32"), default="match")
    parser.add_argument("--peer-python", default=str(REPO / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--out", type=Path, help="append one JSON line per finished run")
    parser.add_argument("--resume-from", type=Path, help="skip the runs this JSON-lines file already has")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    parser.add_argument("--cifar10", help="CIFAR-10 archive or extracted folder (default: $TWINVIEW_CIFAR10)")
    parser.add_argument("--imagewoof", help="Imagewoof-96 archive or extracted folder (default: $TWINVIEW_IMAGEWOOF)")
    parser.add_argument("--output-dir", default=str(cache_dir() / "bench-runs"), help="twinview's run folders")
    parser.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests
    parser.add_argument("--child", choices=("twinview", "lightly"), help=argparse.SUPPRESS)
    parser.add_argument("--protocol", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
