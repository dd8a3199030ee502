"""Run directories: their layout, creation, checkpoints and loading a trained model back.

A run directory holds::

    config.yaml          the resolved config (every key)
    metrics.jsonl        one JSON object per log interval and per epoch
    checkpoints/epoch_NNNN/   Accelerate save_state() output (model, optimiser, scheduler, RNG, progress)
    model.safetensors    final weights of backbone + head (``backbone.*``, ``head.*``)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from twinview.pretrain.config import Config, ConfigError, as_dict, load_config
from twinview.pretrain.models import ContrastiveModel, create_run_model

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoints"
T = TypeVar("T")
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")  # epoch end, or an interrupt mid-epoch


def new_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """Creates the run directory ``train.output_dir / (train.run_name or a timestamp)``.

    Args:
        cfg: The run's config.
        overwrite: Allow a directory that already holds a run.

    Returns:
        The (existing, empty or overwritable) run directory.

    Raises:
        FileExistsError: If the directory already holds a run and ``overwrite`` is false.
    """
    name = cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.train.output_dir).expanduser() / name
    if holds_run(run_dir) and not overwrite:
        raise FileExistsError(
            f"'{run_dir}' already holds a run. Continue it with `twinview pretrain --resume {run_dir}`, "
            f"choose another train.run_name, or pass --overwrite."
        )
    if (run_dir / CONFIG_FILE).exists():  # an overwritten run, or what a refused or failed start left
        _remove_run_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def holds_run(run_dir: Path) -> bool:
    """Whether a directory holds a run worth keeping: a checkpoint or trained weights (a directory
    with only the config of a run that was refused or failed before its first checkpoint does not)."""
    return bool(checkpoints(run_dir)) or (Path(run_dir) / WEIGHTS_FILE).is_file()


def _remove_run_files(run_dir: Path) -> None:
    """Removes what a run writes (checkpoints, logs, skip lists, weights, evaluation), so that a new
    run's files never mix with an earlier one's."""
    for stale in (CHECKPOINT_DIR, ".skipped", "features", "plots", "tensorboard"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    written = (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, "skipped_files.txt", "eval.json", "report.md", "report.html")
    for stale in (*written, "duplicates.csv", "clusters.csv"):
        (run_dir / stale).unlink(missing_ok=True)


def discard_unstarted(run_dir: Path) -> None:
    """After a run stopped before its first checkpoint (refused settings, missing data, an error):
    removes its files and, when nothing else is in it, the directory, so the corrected command
    starts cleanly. A directory that holds a run is left alone."""
    if holds_run(run_dir) or not run_dir.is_dir():
        return
    _remove_run_files(run_dir)
    with contextlib.suppress(OSError):  # not empty: files that are not the run's stay
        run_dir.rmdir()


def new_shared_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """:func:`new_run_dir` for every launched process: the main process creates the directory
    and shares its path (a timestamp name would differ between processes), or its error."""
    return _on_main_shared(cfg, lambda: new_run_dir(cfg, overwrite))


@dataclass(frozen=True)
class AutoStart:
    """What ``train.resume=auto`` decided for a run directory.

    Attributes:
        run_dir: ``train.output_dir / train.run_name``.
        resume: Whether it holds a run to continue (else it was made ready for a new one).
        finished: Whether that run already wrote its final weights after its last epoch.
        saved_yaml: The run's saved config.yaml when it continues (read by the main process, so
            that every process continues with the same settings).
    """

    run_dir: Path
    resume: bool
    finished: bool = False
    saved_yaml: str = ""


def auto_run_dir(cfg: Config) -> AutoStart:
    """``train.resume=auto``: continue ``output_dir/run_name`` when it holds a run of the same
    settings, start it when it holds none (a directory left by a start that failed before its first
    checkpoint is cleared, as by :func:`new_run_dir`).

    Raises:
        ConfigError: If the directory holds a run whose saved settings differ from ``cfg``'s (each
            differing key named, with both values), or whose config.yaml cannot be read.
    """
    run_dir = Path(cfg.train.output_dir).expanduser() / cfg.train.run_name
    if not holds_run(run_dir):
        return AutoStart(new_run_dir(cfg), resume=False)
    try:
        text = (run_dir / CONFIG_FILE).read_text()
        saved = load_run_config(run_dir)
    except Exception as err:  # missing, damaged by hand, or a setting this version no longer knows
        raise ConfigError(
            f"train.resume=auto: '{run_dir}' holds checkpoints but its {CONFIG_FILE} cannot be read "
            f"({type(err).__name__}: {err}). Repair it, or choose another train.run_name."
        ) from None
    differ = settings_differ(saved, cfg)
    if differ:
        raise ConfigError(
            f"train.resume=auto: '{run_dir}' holds a run of other settings ({'; '.join(differ)}). Continue it "
            f"as it was with `twinview pretrain --resume {run_dir}` (KEY=VALUE overrides change it on purpose), "
            f"or choose another train.run_name."
        )
    found = checkpoints(run_dir)
    ended = bool(found) and found[-1] == checkpoint_path(run_dir, saved.train.epochs)
    return AutoStart(run_dir, resume=True, finished=ended and _readable_weights(run_dir), saved_yaml=text)


def _readable_weights(run_dir: Path) -> bool:
    """Whether the run's final weights file exists and its header reads."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(run_dir) / WEIGHTS_FILE), framework="pt") as f:
            return bool(list(f.keys()))
    except Exception:
        return False


def shared_auto_run_dir(cfg: Config) -> AutoStart:
    """:func:`auto_run_dir` decided once, by the main process, for every launched process."""
    return _on_main_shared(cfg, lambda: auto_run_dir(cfg))


# Settings that do not change what a run computes: a continued run may differ in them.
_NOT_COMPARED = {
    "train.resume",
    "train.log_every",
    "train.log_with",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.num_workers",
    "data.strict",
}
_PATHS = {"data.path", "train.output_dir"}


def settings_differ(saved: Config, wanted: Config) -> list[str]:
    """``key: saved -> wanted`` for every setting of ``wanted`` that a run saved differently.

    Left out: every key ``wanted`` leaves as ``auto`` (the run resolved those when it started, e.g.
    the image size and the precision, and saved the result), ``train.resume``, and settings that do
    not change what the run computes (logging, checkpoint cadence, loader workers, ``eval.*``). Local paths are
    compared resolved (``runs`` = ``./runs`` = its absolute path).
    """
    a, b = _flat(as_dict(saved)), _flat(as_dict(wanted))
    return [
        f"{key}: {a.get(key)!r} -> {value!r}"
        for key, value in b.items()
        if key not in _NOT_COMPARED
        and not key.startswith("eval.")  # evaluation and the kNN monitor: they change no weight
        and value != "auto"
        and _normal(key, a.get(key)) != _normal(key, value)
    ]


def _normal(key: str, value: object) -> object:
    """A local path resolved (a URL, glob or ``hf:`` name as written); anything else as it is."""
    if key in _PATHS and isinstance(value, str) and value and ":" not in value:
        return str(Path(value).expanduser().resolve())
    if key == "objective.plugins" and isinstance(value, list):
        return [_normal("data.path", v) if str(v).endswith(".py") else v for v in value]
    return value


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _on_main_shared(cfg: Config, make: Callable[[], T]) -> T:
    """``make()`` on the main process (it creates or reads the run directory), its result or its
    error shared with every launched process (an error that cannot be pickled as its text)."""
    import pickle

    from twinview.pretrain.distributed import process_state

    state = process_state(cfg.train.cpu)
    if state.num_processes == 1:
        return make()
    outcome: list[object] = [None]
    if state.is_main_process:
        try:
            outcome[0] = make()
        except Exception as err:
            try:
                pickle.dumps(err)
                outcome[0] = err
            except Exception:
                outcome[0] = RuntimeError(f"{type(err).__name__}: {err}")
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]  # type: ignore[return-value]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [
        ((int(m.group(1)), int(m.group(2) or -1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_path(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """Directory of the checkpoint written after ``epoch`` completed epochs (and, for an interrupt
    in the next epoch, after global ``step``)."""
    name = f"epoch_{epoch:04d}" + (f"_step_{step:07d}" if step is not None else "")
    return Path(run_dir) / CHECKPOINT_DIR / name


def load_run_config(run_dir: Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Reads a run's saved config (plus overrides).

    Raises:
        FileNotFoundError: If ``run_dir`` holds no config.yaml.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a twinview run directory (no {CONFIG_FILE}).")
    return load_config(path, overrides)


def load_trained_model(run_dir: Path) -> tuple[Config, ContrastiveModel]:
    """Rebuilds a run's model and loads its final weights (strictly).

    Args:
        run_dir: A finished run directory.

    Returns:
        The run's config and the model in eval mode on the CPU.

    Raises:
        FileNotFoundError: If the run has no final weights yet.
    """
    cfg = load_run_config(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"'{run_dir}' has no {WEIGHTS_FILE}: the run has not finished. "
            f"Continue it with `twinview pretrain --resume {run_dir}`."
        )
    model = create_run_model(cfg)
    model.load_state_dict(load_file(weights), strict=True)
    return cfg, model.eval()


def save_weights(model: torch.nn.Module, run_dir: Path) -> Path:
    """Writes the model's state dict as the run's final ``model.safetensors``, atomically: a process
    killed while writing leaves no weights file, so the run does not look finished."""
    path = Path(run_dir) / WEIGHTS_FILE
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial))
    os.replace(partial, path)
    return path
