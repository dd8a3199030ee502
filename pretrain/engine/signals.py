"""Stopping on a signal: the loop finishes its step, checkpoints and exits.

SIGTERM is what Kubernetes, torchrun's agent and SLURM send before they kill a process, SIGINT is
Ctrl-C, and SIGUSR1 is SLURM's warning ahead of the time limit (``#SBATCH --signal=USR1@120``; see
docs/SCALE.md). Each ends the run at the next log point with a checkpoint, so ``--resume auto``
continues it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class TrainingInterrupted(Exception):
    """Training stopped on a signal after checkpointing; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """Remembers a stop signal (``signal``: SIGTERM, SIGINT or SIGUSR1) so the loop can finish its
    step, checkpoint and exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
