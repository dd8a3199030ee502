"""``twinview pretrain``: a new run directory (or the one to resume), then the engine's training.

A run that is refused or fails before its first checkpoint leaves no directory behind, so the
corrected command simply runs; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twinview.pretrain.app.model import is_main_process, main_print
from twinview.pretrain.config import load_config


def run(args: argparse.Namespace) -> int:
    """``twinview pretrain [--config RECIPE] [--resume RUN_DIR] [--overwrite] KEY=VALUE ...``"""
    from twinview.pretrain.engine.step_guard import NonFiniteTraining
    from twinview.pretrain.engine.train import TrainingInterrupted, train
    from twinview.pretrain.runs import discard_unstarted, load_run_config, new_shared_run_dir

    plugins = [*(_saved_plugins(Path(args.resume)) if args.resume and args.plugin else []), *args.plugin]
    overrides = [*plugin_overrides(plugins), *args.overrides]
    try:
        if args.resume:
            run_dir = Path(args.resume)
            cfg = load_run_config(run_dir, overrides)
            train(cfg, run_dir, resume=True, recipe=f"resumed from {run_dir}")
        else:
            cfg = load_config(args.config, overrides)
            run_dir = new_shared_run_dir(cfg, overwrite=args.overwrite)  # one directory for all processes
            main_print(f"Run directory: {run_dir}")
            try:
                train(cfg, run_dir, recipe=str(args.config or ""))
            except (TrainingInterrupted, NonFiniteTraining):
                raise
            except BaseException:  # refused or failed before a checkpoint: leave nothing that blocks a retry
                if is_main_process():
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
