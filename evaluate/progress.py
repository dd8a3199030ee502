"""Progress that suits where it is read: a live bar in a terminal; in a file (CI logs, ``nohup``,
SLURM), plain lines with the same figures, at most one a minute and one at the end, instead of a
bar's carriage-return updates (a bar written to a file is one line of kilobytes per epoch).

Used by the training loop and by the commands that embed images (``twinview embed``, ``evaluate``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

LINE_EVERY_S = 60.0  # without a terminal: a line at most this often


def human_duration(seconds: float) -> str:
    """``4 h 56 min``, ``24 min``, ``1 min 40 s``, ``42 s``: a duration a person reads at a glance."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 600:
        return f"{whole // 60} min {whole % 60} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """Progress over ``total`` units: a tqdm bar on a terminal, else occasional plain lines.

    Args:
        total: Units to do (steps, images).
        desc: What is progressing (``epoch 3/10``, ``embed``).
        unit: The unit's name.
        initial: Units done before (a resumed epoch).
        enabled: False: nothing is shown (processes other than the main one).
        stream: Where to write (standard error).
        every_s: Without a terminal, the least time between two lines.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = LINE_EVERY_S,
    ) -> None:
        self.total, self.desc, self.unit, self.done, self.enabled = total, desc, unit, initial, enabled
        self.stream = stream or sys.stderr
        self.every_s, self.postfix = every_s, ""
        self.start = self.last_line = time.perf_counter()
        self.initial = initial
        self.bar: Any = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            width = _columns(self.stream)  # a terminal that reports no width (e.g. `script`): 80 columns
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=width > 0,
                ncols=None if width > 0 else 80,
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self._line()

    def set_postfix(self, **fields: str) -> None:
        """Figures shown beside the count (``loss=4.1``, ``lr=0.3``)."""
        self.postfix = "  ".join(f"{k} {v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.set_postfix(fields)

    def write(self, text: str, file: TextIO | None = None) -> None:
        """A message on its own line (standard output by default): above the bar on a terminal."""
        if not self.enabled:
            return
        out = file or sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=out)  # tqdm clears the bar, writes, and draws it again
        else:
            print(text, file=out, flush=True)

    def close(self) -> None:
        """Ends the bar; without a terminal, the last line (done, time, figures)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.initial:
            self._line()
            self.enabled = False  # once

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = (
            f", {human_duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        )
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = f"{self.desc}: {self.done}/{self.total} {self.unit}{share} in {human_duration(elapsed)}{left}"
        print(f"{line}  {self.postfix}".rstrip(), file=self.stream, flush=True)
        self.last_line = now


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
