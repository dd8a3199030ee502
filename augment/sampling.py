"""Random parameters for a batch of views, drawn on the batch's device with no host synchronisation.

Every draw takes an explicit ``torch.Generator`` (or ``None`` for torch's global generator), so a
seeded :class:`ViewRNG` makes the same batch give the same views. Decisions that the host must know
(the colour-jitter order) come from a CPU generator kept next to the device one, so a CUDA pipeline
never waits for the GPU to learn them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order (``[obj]`` on one process). augment depends on no
    other twinview package, so this is not taken from twinview.pretrain.distributed."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


class ViewRNG:
    """The random state of an augmentation pipeline: a device generator and a CPU generator.

    ``state_dict`` / ``load_state_dict`` make it checkpointable (Accelerate's
    ``register_for_checkpointing``), so a resumed run draws the views it would have drawn.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        """Args: seed: Seeds both generators. device: Where per-sample parameters are drawn."""
        self.device = torch.device(device)
        self.host = torch.Generator("cpu")
        self.host.manual_seed(seed)
        self.generator = self.host if self.device.type == "cpu" else torch.Generator(self.device)
        if self.generator is not self.host:
            self.generator.manual_seed(seed + 1)

    def _own_state(self) -> dict[str, Any]:
        state = {"host": self.host.get_state()}
        if self.generator is not self.host:
            state["device"] = self.generator.get_state().cpu()
        return state

    def state_dict(self) -> dict[str, Any]:
        """Every process's generator states, in rank order.

        Each process has its own stream, but Accelerate writes registered objects from the main
        process only, so the states are gathered (a collective: every process must call this).
        """
        return {"per_rank": _all_gather_objects(self._own_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores this process's own generator states."""
        per_rank = state["per_rank"]
        if len(per_rank) != _world_size():
            raise ValueError(f"the checkpoint holds views RNG states of {len(per_rank)} processes, not {_world_size()}")
        own = per_rank[_rank()]
        self.host.set_state(own["host"])
        if self.generator is not self.host:
            self.generator.set_state(own["device"])


def uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Samples ``U[low, high)`` of the given shape (float32) on ``device``."""
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


def coin(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` independent Bernoulli(p) draws as a bool tensor. Always draws, so p does not shift the stream."""
    return torch.rand((n,), generator=generator, device=device) < p


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Random-resized-crop boxes with torchvision's semantics, vectorised over the batch.

    For each sample: up to 10 tries of an area fraction ``U(scale)`` and a log-uniform aspect ratio;
    the first crop that fits (integer sides) is placed uniformly at an integer offset. When no try
    fits, the whole image is taken, cropped centrally to the nearest allowed ratio (as torchvision).

    Args:
        n: Number of boxes.
        height: Source image height.
        width: Source image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop's width / height.
        generator: Random generator (``None``: torch's global one).
        device: Device of the result.

    Returns:
        ``(n, 4)`` float32 boxes ``[x0, y0, w, h]`` in source pixels.
    """
    area = float(height * width)
    target = uniform((n, CROP_TRIES), scale[0], scale[1], generator, device).mul_(area)
    log_r = uniform((n, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = log_r.exp_()
    w = (target * aspect).sqrt_().round_()  # (n, tries)
    h = (target / aspect).sqrt_().round_()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try (0 when none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (n,)
    any_fit = fits.any(dim=1)

    in_ratio = width / height  # fallback: torchvision's central crop at the clamped ratio
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand((2, n), generator=generator, device=device)
    x0 = torch.where(any_fit, (u[0] * (width - w + 1)).floor_(), torch.full_like(w, (width - fw) // 2))
    y0 = torch.where(any_fit, (u[1] * (height - h + 1)).floor_(), torch.full_like(h, (height - fh) // 2))
    return torch.stack([x0, y0, w, h], dim=1)


def jitter_factors(
    n: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Per-sample colour-jitter factors with torchvision's ranges.

    Brightness, contrast and saturation factors are ``U[max(0, 1 - s), 1 + s]``; the hue shift is
    ``U[-hue, hue]`` in turns. The identity is ``(1, 1, 1, 0)``.

    Returns:
        ``(n, 4)`` float32 factors: brightness, contrast, saturation, hue.
    """
    factors = torch.rand((n, 4), generator=generator, device=device)
    ranges = [
        (max(0.0, 1 - brightness), 1 + brightness),
        (max(0.0, 1 - contrast), 1 + contrast),
        (max(0.0, 1 - saturation), 1 + saturation),
        (-hue, hue),
    ]
    for column, (low, high) in enumerate(ranges):  # Python scalars: no host-to-device copy
        factors[:, column].mul_(high - low).add_(low)
    return factors


def permutation(k: int, generator: torch.Generator) -> list[int]:
    """A random order of ``range(k)`` from a CPU generator (the host needs it to pick the ops)."""
    return torch.randperm(k, generator=generator).tolist()
