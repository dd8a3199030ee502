"""``twinview finetune``: does pretraining pay? Fine-tuning with few labels, pretrained against from
scratch, with the linear probe beside them.

For each label budget (``--labels 1%,10%,100%`` or ``10/class``: class-balanced, seeded, nested
subsets of the training labels, :mod:`twinview.evaluate.label_subsets`) the backbone is fine-tuned
with a fresh classifier (:mod:`twinview.pretrain.engine.finetune`), the same recipe is run from a
random init of the same architecture (``--baseline``, on by default), and a linear probe of the
frozen pretrained features is trained on the same subset. Everything goes into ``OUT`` (default
``MODEL/finetune``): one folder per fine-tune (checkpoints, log, result, weights), ``finetune.json``,
``label_efficiency.png``, ``predictions.csv`` of the exported model, ``report.md``/``report.html``,
and the best pretrained fine-tune exported in timm's format (``OUT/export``, which
``timm.create_model("local-dir:...", pretrained=True)`` loads with its classifier).

From Python: :func:`finetune_model` (the command's whole work, typed result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinview.evaluate.dataset import check_labelled_pair
from twinview.evaluate.label_subsets import LabelBudget, balanced_subset, parse_budgets
from twinview.evaluate.results import BudgetResult, FinetuneResult, FinetuneScore, ProbeResult
from twinview.pretrain.app.model import TrainedModel, is_main_process, load_model
from twinview.pretrain.config import Config
from twinview.pretrain.data.cache import CachedDataset, build_or_load
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import Source, resolve_source
from twinview.pretrain.engine.finetune import (
    RESULT_FILE,
    WEIGHTS_FILE,
    FinetuneSettings,
    default_layer_decay,
    default_lr,
    finetune,
)
from twinview.pretrain.runs import CHECKPOINT_DIR

RESULT_JSON = "finetune.json"
PREDICTIONS_FILE = "predictions.csv"
SETTINGS_FILE = "settings.json"  # a fine-tune's recipe and subset, checked on --resume
PROBES_FILE = "probes.json"  # the linear probes, kept for --resume
INITS = ("pretrained", "scratch")
OUTPUTS = (
    "finetune.json",
    "predictions.csv",
    "probes.json",
    "label_efficiency.png",
    "report.md",
    "report.html",
    "export",
)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """What a user sets (None: the per-architecture default, printed in the start block).

    Attributes:
        labels: The budgets, e.g. ``"1%,10%,100%"`` or ``"10/class,100%"``.
        baseline: Also fine-tune a random init of the same architecture.
        probe: Also train a linear probe of the frozen pretrained features on each subset.
        epochs: Passes over each subset (small subsets get more, up to ``min_steps`` steps).
        min_steps: Steps every fine-tune takes at least.
        batch_size: Images per process per step.
        lr: Peak AdamW lr for the global batch (None: 1e-3 per 256 for CNNs, 5e-4 for ViTs).
        layer_decay: Layer-wise lr decay of the pretrained fine-tune (None: 0.75 for ViTs, off for
            CNNs; 0 turns it off). The from-scratch baseline never uses it.
        weight_decay: AdamW weight decay.
        precision: ``auto``, ``no``, ``bf16`` or ``fp16``.
        seed: Subsets, heads, data order and views.
        export: Export the best pretrained fine-tune.
        crop_scale: Area range of the training crops (``(1, 1)``: whole images).
        flip: Random horizontal flips (off for data where a mirror changes the class).
    """

    labels: str = "1%,10%,100%"
    baseline: bool = True
    probe: bool = True
    epochs: int = 30
    min_steps: int = 200
    batch_size: int = 128
    lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float = 0.05
    precision: str = "auto"
    seed: int = 0
    export: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True


def check_options(o: FinetuneOptions) -> None:
    """Refuses a setting that cannot work, naming its option, before anything is loaded."""
    checks = [
        ("--epochs", o.epochs >= 1, "at least 1"),
        ("--min-steps", o.min_steps >= 0, "0 or more"),
        ("--batch-size", o.batch_size >= 1, "at least 1"),
        ("--lr", o.lr is None or o.lr > 0, "positive"),
        ("--layer-decay", o.layer_decay is None or 0 <= o.layer_decay <= 1, "in [0, 1] (0: off)"),
        ("--weight-decay", o.weight_decay >= 0, "0 or more"),
        ("--precision", o.precision in ("auto", "no", "bf16", "fp16"), "auto, no, bf16 or fp16"),
        ("--crop-scale", 0 < o.crop_scale[0] <= o.crop_scale[1] <= 1, "two numbers 0 < low <= high <= 1"),
    ]
    for option, ok, must in checks:
        if not ok:
            raise ValueError(f"{option} must be {must}.")
    parse_budgets(o.labels)


class _PerItem(torch.utils.data.Dataset):
    """A data set read item by item (the feature extractor's default batching), for the probe."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


def open_labelled(source: Source, size: int, cfg: Config) -> Any:
    """A labelled source as ``(uint8 image, label)`` items, read as the model's ``data`` section
    says: folders and file lists through the decoded disk cache with ``data.cache`` disk or device
    (decoded once, read as batches), else decoded every epoch; other kinds through ``open_images``."""
    if source.read_by_datasets or cfg.data.cache == "none":
        return open_images(source, size, strict=cfg.data.strict)
    cache = build_or_load(source.files, size, workers=cfg.data.num_workers, strict=cfg.data.strict)
    if cache.skipped and is_main_process():
        shown = "; ".join(f"{path}: {why}" for path, why in list(cache.skipped.items())[:3])
        print(f"{len(cache.skipped)} image(s) of {source.path} cannot be decoded and are left out: {shown}")
    return CachedDataset(cache)


def resolve_settings(model: TrainedModel, options: FinetuneOptions, processes: int) -> FinetuneSettings:
    """The fine-tuning recipe: the options, the architecture's defaults and the run's image sizes."""
    from twinview.pretrain.engine.run_start import resolve_precision
    from twinview.pretrain.engine.train import current_world

    cfg = model.cfg
    auto = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=options.precision))
    precision = resolve_precision(auto, current_world(auto))[0].train.mixed_precision
    global_batch = options.batch_size * processes
    layer_decay = options.layer_decay if options.layer_decay is not None else default_layer_decay(model.backbone)
    return FinetuneSettings(
        epochs=options.epochs,
        min_steps=options.min_steps,
        batch_size=options.batch_size,
        lr=options.lr if options.lr is not None else default_lr(model.backbone, global_batch),
        weight_decay=options.weight_decay,
        layer_decay=layer_decay or None,
        warmup_fraction=0.1,
        label_smoothing=0.1,
        crop_size=cfg.augment.crop_size or cfg.data.size,
        crop_scale=options.crop_scale,
        flip_p=0.5 if options.flip else 0.0,
        mixed_precision=precision,
        seed=options.seed,
        num_workers=cfg.data.num_workers,
        eval_batch_size=cfg.eval.batch_size,
    )


def _for_init(settings: FinetuneSettings, init: str) -> FinetuneSettings:
    """Layer-wise lr decay keeps what the pretrained early layers learnt; a random init has nothing
    to keep (DeiT trains ViTs from scratch without it), so the baseline runs without it."""
    return settings if init == "pretrained" else dataclasses.replace(settings, layer_decay=None)


def _slug(budget: LabelBudget) -> str:
    return budget.text.replace("%", "pct").replace("/", "-per-")


def finetune_model(
    model_path: Path | str,
    train: str,
    test: str,
    options: FinetuneOptions = FinetuneOptions(),
    out: Path | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> FinetuneResult:
    """Measures label efficiency: the whole of ``twinview finetune``.

    Args:
        model_path: A run directory or a ``twinview export`` folder.
        train: Labelled training source (anything ``data.path`` accepts, with labels).
        test: Labelled test source with the same classes.
        options: Budgets, baseline, probe and recipe settings.
        out: Output folder (default ``MODEL/finetune``).
        resume: Continue an interrupted fine-tune in ``out`` (finished parts are kept).
        overwrite: Start again in an ``out`` that already holds results.
        overrides: Dotted overrides of the model's config (``data.num_workers=4``, ``eval.batch_size=64``).

    Returns:
        The result also written to ``OUT/finetune.json`` (on the main process).

    Raises:
        ValueError: Unlabelled sources, different classes, or a budget too small for some class,
            before any training.
        FileExistsError: ``out`` holds results and neither ``resume`` nor ``overwrite`` is set.
    """
    from twinview.pretrain.distributed import process_state

    check_options(options)
    model = load_model(Path(model_path), list(overrides))
    cfg, size = model.cfg, model.cfg.data.size
    out_dir = Path(out) if out is not None else Path(model_path) / "finetune"
    sources = resolve_source(train, survey=False), resolve_source(test, survey=False)
    check_labelled_pair(open_images(sources[0], size), open_images(sources[1], size), ("--train", "--test"))
    budgets = parse_budgets(options.labels)
    state = process_state(False)
    train_set = open_labelled(sources[0], size, cfg)
    test_set = open_labelled(sources[1], size, cfg)
    labels, classes = list(train_set.index.labels), list(train_set.index.classes)
    subsets = {b.text: balanced_subset(labels, b, options.seed, classes) for b in budgets}  # refused here, not later
    budgets.sort(key=lambda b: len(subsets[b.text]))  # the table and the curve run from few labels to many
    _prepare_out(out_dir, resume, overwrite, state.is_main_process)
    state.wait_for_everyone()
    settings = resolve_settings(model, options, state.num_processes)
    test_labels = torch.tensor(list(test_set.index.labels), dtype=torch.long)
    _print_start(state, model, settings, options, budgets, subsets, len(labels), len(test_labels), out_dir)

    inits = INITS if options.baseline else INITS[:1]
    for budget in budgets:  # before any compute: a resumed folder of other settings is refused
        for init in inits:
            _check_same_settings(out_dir / f"{_slug(budget)}-{init}", _for_init(settings, init), subsets[budget.text])
    probes = _probes(model, train_set, test_set, subsets, options.seed, out_dir) if options.probe else {}
    results, best = [], None
    for budget in budgets:
        idx = subsets[budget.text]
        scores: dict[str, FinetuneScore] = {}
        for init in inits:
            folder = out_dir / f"{_slug(budget)}-{init}"
            backbone = model.backbone if init == "pretrained" else model.random_init()
            scores[init] = _one(
                backbone,
                len(classes),
                train_set,
                idx,
                test_set,
                test_labels,
                _for_init(settings, init),
                folder,
                init,
                budget,
            )
            if init == "pretrained" and (best is None or scores[init].top1 > best[1].top1):
                best = (budget, scores[init], folder)
        results.append(
            BudgetResult(budget.text, len(idx), scores["pretrained"], scores.get("scratch"), probes.get(budget.text))
        )
    exported = None
    if options.export and best is not None and state.is_main_process:
        exported = _export_best(model, best[2], out_dir, classes, settings)
    result = FinetuneResult(
        model=str(model_path),
        backbone=cfg.model.backbone,
        train_images=len(labels),
        test_images=len(test_labels),
        classes=len(classes),
        settings=settings.to_json(),
        budgets=tuple(results),
        exported=str(exported) if exported else None,
        exported_labels=best[0].text if exported and best else None,
    )
    if state.is_main_process:
        _write_outputs(result, out_dir)
    state.wait_for_everyone()
    return result


def _prepare_out(out_dir: Path, resume: bool, overwrite: bool, main: bool) -> None:
    holds = out_dir.is_dir() and any(out_dir.iterdir())
    if holds and not (resume or overwrite):
        raise FileExistsError(
            f"'{out_dir}' already holds a fine-tune: add --resume to continue it, --overwrite to start again, "
            "or choose another --out."
        )
    if holds and overwrite and not resume and main:  # only what finetune writes: never a run given by mistake
        for path in out_dir.iterdir():
            ours = path.name in OUTPUTS or path.name.endswith(tuple(f"-{init}" for init in INITS))
            if ours and path.is_dir():
                shutil.rmtree(path)
            elif ours:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _one(
    backbone: torch.nn.Module,
    num_classes: int,
    train_set: Any,
    idx: Any,
    test_set: Any,
    test_labels: torch.Tensor,
    settings: FinetuneSettings,
    folder: Path,
    init: str,
    budget: LabelBudget,
) -> FinetuneScore:
    """One fine-tune, or its saved result when it finished before (a resumed command)."""
    done = folder / RESULT_FILE
    if done.is_file():
        saved = json.loads(done.read_text())
        if is_main_process():
            print(f"[{budget.text} {init}] finished before: top-1 {saved['top1']:.4f}")
        return FinetuneScore(**saved)
    score, net, logits = finetune(
        backbone,
        num_classes,
        train_set,
        idx,
        test_set,
        test_labels,
        settings,
        folder,
        resume=True,  # a folder with a checkpoint was interrupted: continue it
        progress_line=f"[{budget.text} {init}] ",
    )
    if is_main_process():
        torch.save(net.state_dict(), folder / WEIGHTS_FILE)
        write_predictions(folder / PREDICTIONS_FILE, test_set, test_labels, logits)
        partial = done.with_suffix(".partial")
        partial.write_text(json.dumps(dataclasses.asdict(score)))
        partial.replace(done)  # atomic: a kill mid-write leaves no half result
        shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)  # finished: the result and weights stay
        print(f"[{budget.text} {init}] test top-1 {score.top1:.4f}, top-5 {score.top5:.4f} ({score.seconds:.0f} s)")
    return score


def write_predictions(path: Path, test_set: Any, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """``path,label,predicted`` (class names) of every test image, in order."""
    import csv

    index = test_set.index
    names = list(index.classes)
    predicted = logits.argmax(dim=1).tolist()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "predicted"])
        for file, y, p in zip(index.files, labels.tolist(), predicted, strict=True):
            writer.writerow([str(file), names[y], names[p]])


def subset_sha1(idx: Any) -> str:
    """A fingerprint of a subset's indices."""
    import hashlib

    return hashlib.sha1(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()


def _check_same_settings(folder: Path, settings: FinetuneSettings, idx: Any) -> None:
    """Records a fine-tune's recipe and subset in its folder, or refuses to resume one made with
    other settings (its result or checkpoint would be reused under the new ones)."""
    from accelerate import PartialState

    state = PartialState()
    record = {"settings": settings.to_json(), "processes": state.num_processes, "subset_sha1": subset_sha1(idx)}
    path = folder / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(record)):
            changed = sorted(k for k in record["settings"] if saved["settings"].get(k) != record["settings"][k])
            changed += [k for k in ("processes", "subset_sha1") if saved.get(k) != record[k]]
            raise ValueError(
                f"--resume: '{folder}' was fine-tuned with other settings ({', '.join(changed)} differ: another "
                "--seed, --labels subset, recipe option or number of processes); use the same ones, --overwrite, "
                "or another --out."
            )
        return
    state.wait_for_everyone()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()


def _probes(
    model: TrainedModel, train_set: Any, test_set: Any, subsets: dict[str, Any], seed: int, out_dir: Path
) -> dict[str, ProbeResult]:
    """A linear probe of the frozen pretrained features on each subset (features extracted once;
    probes finished before are read back from ``probes.json``)."""
    from twinview.evaluate.linear_probe import linear_probe

    path = out_dir / PROBES_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    keys = {k: {"subset_sha1": subset_sha1(idx), "seed": seed} for k, idx in subsets.items()}
    probes = {k: ProbeResult(**v["result"]) for k, v in saved.items() if k in keys and v["key"] == keys[k]}
    todo = [k for k in subsets if k not in probes]
    if todo:
        embedder = model.embedder()
        train_x, train_y = embedder.features(_PerItem(train_set))  # type: ignore[arg-type]
        test_x, test_y = embedder.features(_PerItem(test_set))  # type: ignore[arg-type]
        model.backbone.to("cpu")
        for text in todo:
            sel = torch.as_tensor(subsets[text], dtype=torch.long)
            probes[text] = linear_probe(train_x[sel], train_y[sel], test_x, test_y, seed=seed)
    for text in subsets:
        if is_main_process():
            print(f"[{text} probe] test top-1 {probes[text].top1:.4f}")
    if is_main_process():
        out = {k: {"key": keys[k], "result": dataclasses.asdict(v)} for k, v in probes.items()}
        path.write_text(json.dumps(out, indent=2) + "\n")
    return probes


def _export_best(
    model: TrainedModel, folder: Path, out_dir: Path, classes: list[str], settings: FinetuneSettings
) -> Path:
    """Exports the best pretrained fine-tune in timm's format, its test predictions beside it."""
    from twinview.pretrain.app.export import export_backbone
    from twinview.pretrain.engine.finetune import classifier

    net = classifier(model.backbone, len(classes), settings.seed)
    net.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True))
    target = out_dir / "export"
    shutil.rmtree(target, ignore_errors=True)
    export_backbone(net.eval(), model.cfg, target, label_names=classes)
    shutil.copyfile(folder / PREDICTIONS_FILE, out_dir / PREDICTIONS_FILE)
    return target


def _write_outputs(result: FinetuneResult, out_dir: Path) -> None:
    from twinview.evaluate.plots import label_efficiency
    from twinview.evaluate.report import finetune_section, write_report

    (out_dir / RESULT_JSON).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot = label_efficiency(result, out_dir / "label_efficiency.png")
    files = [(out_dir / RESULT_JSON, "all numbers")]
    if result.exported:
        files.append((Path(result.exported), "the best pretrained fine-tune, in timm's format"))
    write_report([finetune_section(result, plot, files)], out_dir, f"Fine-tuning: {result.backbone}")
    print(_table(result))
    print(f"Wrote {out_dir / RESULT_JSON}, {plot.name}, report.md and report.html in {out_dir}")


def _table(result: FinetuneResult) -> str:
    lines = [f"{'labels':>10} {'images':>7} {'pretrained':>11} {'scratch':>8} {'probe':>6}"]
    for b in result.budgets:
        scratch = f"{b.scratch.top1:.4f}" if b.scratch else "-"
        probe = f"{b.probe.top1:.4f}" if b.probe else "-"
        lines.append(f"{b.labels:>10} {b.images:>7} {b.pretrained.top1:>11.4f} {scratch:>8} {probe:>6}")
    return "\n".join(lines)


def _print_start(
    state: Any,
    model: TrainedModel,
    settings: FinetuneSettings,
    options: FinetuneOptions,
    budgets: list[LabelBudget],
    subsets: dict[str, Any],
    train_images: int,
    test_images: int,
    out_dir: Path,
) -> None:
    if not state.is_main_process:
        return
    s = settings
    per = ", ".join(f"{b.text}: {len(subsets[b.text])} images" for b in budgets)
    lines = [
        f"twinview finetune: {model.cfg.model.backbone} from {model.path}",
        f"  data        {train_images} labelled training images, {test_images} test images; budgets {per}",
        f"  fine-tunes  pretrained{' and from scratch (random init)' if options.baseline else ''}, "
        f"{'with' if options.probe else 'no'} linear probe",
        f"  recipe      AdamW lr {s.lr:g} (global batch {s.batch_size * state.num_processes}), wd {s.weight_decay:g}, "
        f"layer decay {f'{s.layer_decay:g} (pretrained only)' if s.layer_decay else 'off'}, "
        f"cosine with {s.warmup_fraction:.0%} warm-up, "
        f"label smoothing {s.label_smoothing:g}",
        f"  schedule    {s.epochs} epochs, at least {s.min_steps} steps per fine-tune (small subsets: more epochs)",
        f"  views       random resized crop {s.crop_size} px (scale {s.crop_scale[0]:g}-{s.crop_scale[1]:g}) + flip on "
        f"{state.device}; test images whole at {model.cfg.data.size} px",
        f"  precision   {s.mixed_precision}; processes {state.num_processes}",
        f"  output      {out_dir}",
    ]
    print("\n".join(lines))


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop-scale: '{text}' is not two numbers LOW,HIGH (e.g. 0.25,1).") from None
    return low, high


def run(args: argparse.Namespace) -> int:
    """``twinview finetune MODEL --train DIR --test DIR [--labels ...] [options] [KEY=VALUE ...]``"""
    from twinview.pretrain.engine.signals import TrainingInterrupted

    options = FinetuneOptions(
        labels=args.labels,
        baseline=args.baseline,
        probe=args.probe,
        epochs=args.epochs,
        min_steps=args.min_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        precision=args.precision,
        seed=args.seed,
        export=args.export,
        crop_scale=_pair(args.crop_scale),
        flip=args.flip,
    )
    try:
        finetune_model(
            args.model, args.train, args.test, options, args.out, args.resume, args.overwrite, args.overrides
        )
    except TrainingInterrupted as stop:
        print(f"twinview finetune: {stop}", file=sys.stderr)
        return 128 + stop.signum
    return 0
