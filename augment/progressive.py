"""Progressive resolution: the global views start small and grow to their full side during training.

Smaller views mean fewer pixels per convolution. FFCV trains ImageNet this way (Leclerc et al. 2023,
"FFCV: Accelerating Training by Removing Data Bottlenecks": ResNet-50 at 160 px for most epochs, a
linear ramp to 192 px near the end). What it saves and costs depends on the device and the data: on
a CPU a step's time is not proportional to the pixels, and on Imagewoof-96 it lost accuracy per
second (docs/BENCHMARKS.md, 'Progressive resolution'), so no recipe turns it on.

The side is a function of the epoch only, so a resumed run makes the same views as an uninterrupted
one. The schedule is resolved once per run (:func:`resolution_schedule`) and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass

from twinview.augment.config import AugmentConfig


@dataclass(frozen=True)
class ResolutionSchedule:
    """The side of the global views per epoch: ``low`` until epoch ``start``, then a linear ramp
    (rounded down to multiples of ``multiple``) to ``high``, reached at epoch ``end`` and kept.

    Attributes:
        low: Side of the global views in the first epochs, in pixels.
        high: Their full side (``augment.crop_size`` or ``data.image_size``).
        start: First epoch (0-based) of the ramp; epochs before it use ``low``.
        end: First epoch at ``high``.
        multiple: Sides in the ramp are rounded down to multiples of this.
    """

    low: int
    high: int
    start: int
    end: int
    multiple: int

    def side(self, epoch: int) -> int:
        """The global view side for 0-based ``epoch``."""
        if epoch >= self.end:
            return self.high
        if epoch <= self.start:
            return self.low
        exact = self.low + (self.high - self.low) * (epoch - self.start) / (self.end - self.start)
        return max(self.low, int(exact // self.multiple) * self.multiple)

    def describe(self, epochs: int) -> str:
        """For the start block: the sides and their 1-based epochs, e.g. ``32 px epochs 1-14, 48 px
        15-17, 64 px 18-20``."""
        runs: list[list[int]] = []  # [side, first, last]
        for epoch in range(epochs):
            side = self.side(epoch)
            if runs and runs[-1][0] == side:
                runs[-1][2] = epoch + 1
            else:
                runs.append([side, epoch + 1, epoch + 1])
        parts = [f"{side} px {first}-{last}" if first != last else f"{side} px {first}" for side, first, last in runs]
        return "epochs " + ", ".join(parts)


def resolution_schedule(cfg: AugmentConfig, full_side: int, epochs: int) -> ResolutionSchedule | None:
    """The run's schedule from ``augment.progressive_*``; None when progressive resolution is off.

    Args:
        cfg: The augment section (checked by ``validate``).
        full_side: The global view side at the end (``augment.crop_size`` or ``data.image_size``).
        epochs: ``train.epochs``; the ramp's fractions are of these.
    """
    if not cfg.progressive_min or cfg.progressive_min >= full_side:
        return None
    first, last = cfg.progressive_ramp
    end = min(epochs - 1, round(last * epochs))  # the last epoch at least is at the full side
    start = min(end, round(first * epochs))
    return ResolutionSchedule(cfg.progressive_min, full_side, start, end, cfg.progressive_multiple)
