"""``twinview pretrain``: a new run directory (or the one to resume), then the engine's training.

A run that is refused or fails before its first checkpoint leaves no directory behind, so the
corrected command simply runs; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from twinview.pretrain.app.model import is_main_process, main_print
from twinview.pretrain.config import Config, ConfigError, load_config


def run(args: argparse.Namespace) -> int:
    """``twinview pretrain [--config RECIPE] [--resume RUN_DIR | --resume auto] [--overwrite] KEY=VALUE ...``

    ``--resume auto`` (or ``train.resume=auto``) continues ``train.output_dir/train.run_name`` when it
    holds a run of the same settings and starts it otherwise: the command a restarted or requeued job
    repeats unchanged.
    """
    from twinview.pretrain.engine.step_guard import NonFiniteTraining
    from twinview.pretrain.engine.train import TrainingInterrupted, train
    from twinview.pretrain.runs import discard_unstarted, new_shared_run_dir, shared_auto_run_dir

    auto = args.resume == "auto"
    given = Path(args.resume) if args.resume and not auto else None  # --resume RUN_DIR
    plugins = [*(_saved_plugins(given) if given and args.plugin else []), *args.plugin]
    overrides = [*plugin_overrides(plugins), *args.overrides, *(["train.resume=auto"] if auto else [])]
    try:
        if given is not None:
            run_dir, cfg, resume = given, _run_config(given, overrides), True
        else:
            cfg = load_config(args.config, overrides)
            if cfg.train.resume == "auto":  # the same command starts the run and continues it after a restart
                if args.overwrite:
                    raise ConfigError("--overwrite and train.resume=auto contradict each other: choose one.")
                start = shared_auto_run_dir(cfg)  # decided once, by the main process
                if start.finished:
                    main_print(f"{start.run_dir} has finished all {cfg.train.epochs} epochs; nothing to do.")
                    return 0
                run_dir, resume = start.run_dir, start.resume
                if resume:  # as saved (the image size and precision it resolved), read by the main process
                    cfg = _config_from_yaml(start.saved_yaml, plugin_overrides(plugins))
                    main_print(f"Continuing {run_dir} (train.resume=auto).")
            else:
                run_dir, resume = new_shared_run_dir(cfg, overwrite=args.overwrite), False  # one for all processes
            if not resume:
                main_print(f"Run directory: {run_dir}")
        try:
            train(cfg, run_dir, resume=resume, recipe=f"resumed from {run_dir}" if resume else str(args.config or ""))
        except (TrainingInterrupted, NonFiniteTraining):
            raise
        except BaseException:  # refused or failed before a checkpoint: leave nothing that blocks a retry
            if not resume and is_main_process():
                discard_unstarted(run_dir)
            raise
    except TrainingInterrupted as stop:
        print(f"twinview pretrain: interrupted by {stop}", file=sys.stderr)
        return 128 + stop.signum
    except NonFiniteTraining as err:
        print(f"twinview pretrain: stopped: {err}", file=sys.stderr)
        return 3
    main_print(f"Done. Run directory: {run_dir}")
    return 0


def _run_config(run_dir: Path, overrides: list[str]) -> Config:
    """A run's saved config; where it is missing on one of several launched processes, the error
    says that every machine must see the run directory."""
    from twinview.pretrain.runs import load_run_config

    try:
        return load_run_config(run_dir, overrides)
    except FileNotFoundError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FileNotFoundError(
                f"{err} Several machines resume a run only from a disk they all see (docs/SCALE.md)."
            ) from None
        raise


def _config_from_yaml(text: str, overrides: list[str]) -> Config:
    """A config from the text of a saved config.yaml (plus overrides)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(path, overrides)


def _saved_plugins(run_dir: Path) -> list[str]:
    """The plugins a run's config.yaml names (``--plugin`` on ``--resume`` adds to them)."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    saved = OmegaConf.select(OmegaConf.load(path), "objective.plugins", default=[]) if path.is_file() else []
    return [str(p) for p in saved]


def plugin_overrides(plugins: list[str]) -> list[str]:
    """``--plugin`` as the override of ``objective.plugins`` (nothing when none is given; the config
    loader records a ``.py`` file by its absolute path)."""
    return [f"objective.plugins=[{','.join(plugins)}]"] if plugins else []
