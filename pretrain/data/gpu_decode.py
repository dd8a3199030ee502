"""JPEG decoding on the device (``data.decode=gpu``): workers read file bytes, nvJPEG decodes batches.

On a GPU machine the CPU often cannot decode photos as fast as the GPU trains on them. Here the
DataLoader workers only read each file's header and bytes: a baseline RGB or grayscale JPEG
without an EXIF rotation travels as its compressed bytes; anything else (PNG, WebP, CMYK or
rotated JPEGs) is decoded in the worker as on the CPU path. On the device,
``torchvision.io.decode_jpeg(device="cuda")`` decodes the batch's JPEGs in one call, then each is
centre-cropped to a square and resized to ``data.image_size`` (bicubic, antialiased), as
:func:`twinview.pretrain.data.decode.square_rgb` does on the CPU.

A file nvJPEG rejects is decoded again alone, then on the CPU (PIL); one that fails there too is
recorded in the skip log with its reason and replaced by the next decodable item, as the CPU path
does, so a batch keeps its size (``data.strict=true`` raises instead).
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

# At module level, not in the decoder: torchvision's first import inside a call keeps that call's
# frames alive until the garbage collector runs (torch.fx.wrap holds its frame), and with them the
# DataLoader, whose workers ignore SIGTERM and would then keep the process from exiting.
from torchvision.io import ImageReadMode, decode_jpeg

from twinview.pretrain.data.decode import BadImage, square_rgb
from twinview.pretrain.data.folder import ImageFolderDataset, first_decodable, load_image

EXIF_ORIENTATION = 0x0112
Payload = torch.Tensor  # 1-D uint8: a JPEG's bytes; (3, S, S) uint8: an image decoded in the worker
# What a worker sends: every payload's bytes back to back (N,) uint8, their offsets (B + 1,), whether
# each is decoded pixels (B,) bool, labels (B,), item indices (B,)
EncodedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def read_for_device(path: Path, size: int) -> Payload:
    """A JPEG nvJPEG can take as its bytes; any other image decoded here (``(3, size, size)``).

    Raises:
        BadImage: When the file cannot be used (from the CPU decoder, with its reason).
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            plain = img.format == "JPEG" and img.mode in ("RGB", "L")
            plain = plain and img.getexif().get(EXIF_ORIENTATION, 1) == 1
            # what the CPU path refuses stays with it: pixel counts over PIL's limit, and files
            # without the end-of-image marker (hardware decoders may return garbage for those
            # instead of an error)
            plain = plain and img.width * img.height <= (Image.MAX_IMAGE_PIXELS or float("inf"))
            plain = plain and data.rstrip(b"\x00").endswith(b"\xff\xd9")
    except Exception:  # unreadable or not an image: the CPU decoder says why
        plain = False
    if plain:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return load_image(path, size)


class EncodedImageFolder(Dataset):
    """The items of an image folder as ``(payload, label, index)``, for :class:`DeviceDecoder`."""

    def __init__(self, folder: ImageFolderDataset) -> None:
        self.folder, self.index = folder, folder.index

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Payload, int, int]:
        f = self.folder
        return first_decodable(
            i,
            len(f),
            lambda j: (read_for_device(f.index.files[j], f.image_size), f.index.labels[j], j),
            lambda j: f.index.files[j],
            f.bad,
            f.strict,
            f.skip_log,
        )


def encoded_collate(items: Sequence[tuple[Payload, int, int]]) -> EncodedBatch:
    """Packs a batch's payloads into one byte tensor with offsets.

    One tensor, not B: a worker hands every tensor of a batch to the main process as its own
    shared-memory file, and B payloads per batch, times the batches in flight (workers x
    prefetch), exceed the usual limit of 1,024 open files at batch 256 ("Too many open files").
    """
    flat = [p.reshape(-1) for p, _, _ in items]
    offsets = torch.zeros(len(flat) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([p.numel() for p in flat]).cumsum(0)
    return (
        torch.cat(flat),
        offsets,
        torch.tensor([p.dim() == 3 for p, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([i for _, _, i in items]),
    )


def unpack(batch: EncodedBatch, size: int) -> tuple[list[Payload], torch.Tensor, torch.Tensor]:
    """The payloads of a packed batch (views into it: JPEG bytes, or ``(3, size, size)`` pixels),
    its labels and item indices."""
    blob, offsets, decoded, labels, indices = batch
    bounds = offsets.tolist()
    payloads = [blob[a:b] for a, b in itertools.pairwise(bounds)]
    payloads = [p.view(3, size, size) if d else p for p, d in zip(payloads, decoded.tolist(), strict=True)]
    return payloads, labels, indices


def centre_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, size, size)``: the centred square, resized bicubic with antialiasing."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top : top + side, left : left + side]
    if side == size:
        return square
    resized = F.interpolate(square[None].float(), size=(size, size), mode="bicubic", antialias=True)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecoder:
    """Turns a batch of payloads into ``(B, 3, S, S)`` uint8 images on the device."""

    def __init__(
        self,
        folder: ImageFolderDataset,
        device: torch.device,
        decode_jpegs: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> None:
        """Args:
        folder: The folder the payloads come from (files, image size, skip log, strictness).
        device: Where the images go.
        decode_jpegs: Decodes a list of JPEG byte tensors (on the CPU) to ``(3, H, W)`` RGB uint8
            tensors on ``device``; default torchvision's nvJPEG decoder (``decode_jpeg``).
        """
        self.folder, self.device = folder, device
        if decode_jpegs is None:

            def decode_jpegs(data: list[torch.Tensor]) -> list[torch.Tensor]:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))

        self.decode_jpegs = decode_jpegs
        self.rejected: set[int] = set()  # items nvJPEG failed on: sent to the CPU from then on

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``(B, 3, S, S)`` uint8 images and ``(B,)`` labels on the device (a replaced
        file's label is its replacement's)."""
        return self.decode(*unpack(batch, self.folder.image_size))

    def decode(
        self, payloads: list[Payload], labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` of an unpacked batch."""
        size = self.folder.image_size
        out = torch.empty((len(payloads), 3, size, size), dtype=torch.uint8, device=self.device)
        jpegs = [k for k, p in enumerate(payloads) if p.dim() == 1 and int(indices[k]) not in self.rejected]
        cpu = [k for k, p in enumerate(payloads) if p.dim() == 1 and int(indices[k]) in self.rejected]
        for k, p in enumerate(payloads):
            if p.dim() == 3:  # decoded in the worker
                out[k] = p.to(self.device, non_blocking=True)
        decoded: list[torch.Tensor | None] = []
        if jpegs:
            try:
                decoded = list(self.decode_jpegs([payloads[k] for k in jpegs]))
            except RuntimeError as err:  # one file nvJPEG rejects fails the batch call: one by one
                _reraise_out_of_memory(err)
                decoded = [self._one(payloads[k], int(indices[k])) for k in jpegs]
        replaced: dict[int, int] = {}
        # The images differ in size, so each is cropped and resized on its own (one small kernel
        # launch each; batching them would need padding to the largest).
        for k, image in [*zip(jpegs, decoded, strict=True), *((k, None) for k in cpu)]:
            if image is None:
                image, label = self._cpu(payloads[k], int(indices[k]), int(labels[k]))
                replaced[k] = label
            out[k] = centre_square(image.to(self.device), size)
        if replaced:
            labels = labels.clone()
            for k, label in replaced.items():
                labels[k] = label
        return out, labels.to(self.device, non_blocking=True)

    def _one(self, data: torch.Tensor, i: int) -> torch.Tensor | None:
        try:
            return self.decode_jpegs([data])[0]
        except RuntimeError as err:
            _reraise_out_of_memory(err)
            if not self.rejected:
                warnings.warn(
                    f"nvJPEG could not decode {self.folder.index.files[i]} ({err}); such files are "
                    "decoded on the CPU from now on.",
                    stacklevel=2,
                )
            self.rejected.add(i)
            return None

    def _cpu(self, data: torch.Tensor, i: int, label: int) -> tuple[torch.Tensor, int]:
        """The file decoded by PIL, and its label; when that fails too, skipped as on the CPU path
        (the next decodable item and its label)."""
        if i in self.folder.bad:  # known bad: straight to the replacement, not logged again
            return ImageFolderDataset.__getitem__(self.folder, (i + 1) % len(self.folder))
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                img.load()
                array = square_rgb(ImageOps.exif_transpose(img), self.folder.image_size)
            return torch.from_numpy(array).permute(2, 0, 1), label
        except Exception as err:
            reason = f"corrupt or truncated: {err}"
            path = self.folder.index.files[i]
            if self.folder.strict:
                raise BadImage(f"{path}: {reason} (data.strict=true)") from None
            self.folder.bad[i] = reason
            if self.folder.skip_log is not None:
                self.folder.skip_log.record(path, reason)
            return ImageFolderDataset.__getitem__(self.folder, (i + 1) % len(self.folder))


def _reraise_out_of_memory(err: RuntimeError) -> None:
    """torchvision reports a CUDA out-of-memory as a plain RuntimeError: that is no bad file."""
    if "out of memory" in str(err).lower():
        raise err
