"""Near-exact copies found without a model: perceptual hashes of each image and of its mirror.

A re-encoded, resized, slightly cropped or mirrored copy of a photo keeps its coarse structure, and
so its perceptual hash (within a few bits), however long or briefly a backbone was trained; an
embedding's cosine to its original depends on that training. The hash is ``imagehash``'s pHash
(Zauner, "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010, as
``imagehash.phash`` computes it): the image in grayscale at 32 x 32, its 2-D DCT, and one bit per
coefficient of the 8 x 8 lowest frequencies, set where it is above their median: 64 bits.

Two images are a pair when the Hamming distance between one's hash and the other's hash, or the
other's mirror's hash, is at most ``max_distance`` (imagededup's default for pHash is 10 of 64), and
their 8 x 8 grayscale thumbnails (or one's and the other's mirror) differ by at most
:data:`THUMB_MAX_DIFF` on average. The hash alone is not enough: over a large set some unrelated
image always comes within a few bits, and for small, plain images (the demo's 8 x 8 digits) 152 of
the 300 test images had one of the 1,497 training images within 10 bits. Measured on Imagewoof-96
(100 photos) and the digits: JPEG re-encodes, mirrors and half-size copies differ by at most 0.9,
copies with a 2.5 % border cropped by 4.3 (median) to 13.2, while the nearest distinct photo
differs by 12.1 or more and the digit look-alikes by 9.4 or more.
The search compares every pair, in blocks of rows (memory ``block x N`` bytes x 8), which is
right up to ~10^5 images; beyond that, faiss's binary indexes are the tool.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

HASH_BITS = 64
MAX_DISTANCE = 10  # bits of 64 (imagededup's pHash default)
THUMB_SIDE = 8
THUMB_MAX_DIFF = 8.0  # mean absolute difference (0-255) of two 8 x 8 grayscale thumbnails of a copy
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class HashPair:
    """Two images whose perceptual hashes are close.

    Attributes:
        a: Index of the first image (``a < b``).
        b: Index of the second image.
        distance: Hamming distance in bits (of :data:`HASH_BITS`), the smaller of image-to-image and
            image-to-mirror.
        mirrored: The distance is the one to the mirror image.
    """

    a: int
    b: int
    distance: int
    mirrored: bool = False


def image_hash(image: Image.Image) -> tuple[int, int]:
    """The pHash of an image and of its mirror image, as 64-bit integers."""
    import imagehash  # only the label-free evaluation needs it

    gray = image.convert("L")
    return _as_int(imagehash.phash(gray)), _as_int(imagehash.phash(ImageOps.mirror(gray)))


def _as_int(h: object) -> int:
    return int(str(h), 16)  # an ImageHash prints as 16 hex digits


def image_hashes(images: Iterable[Image.Image]) -> np.ndarray:
    """``(N, 2)`` uint64: each image's pHash and its mirror image's."""
    return np.array([image_hash(im) for im in images], dtype=np.uint64).reshape(-1, 2)


@dataclass(frozen=True)
class ImageScan:
    """What one extra decoding pass over a data set gives the label-free evaluation.

    Attributes:
        hashes: ``(N, 2)`` uint64: each image's pHash and its mirror image's.
        pixel_std: ``(N,)`` float32: the largest over the colour channels of the standard deviation
            of a channel's pixel values (0-255): low for blank and single-colour images.
        thumbs: ``(N, 8, 8)`` uint8 grayscale thumbnails (box-filtered), which confirm a hash match.
    """

    hashes: np.ndarray
    pixel_std: np.ndarray
    thumbs: np.ndarray


def scan_images(dataset: Any, workers: int = 2, batch: int = 256) -> ImageScan:
    """Hashes and pixel spreads of a data set's ``(uint8 (3,S,S), label)`` items, in order, computed
    in DataLoader workers (any sized, indexable data set, e.g. a ``LabelledSubset``)."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_scan_batch)
    parts = list(loader)
    if not parts:
        empty = np.zeros((0, THUMB_SIDE, THUMB_SIDE), dtype=np.uint8)
        return ImageScan(np.zeros((0, 2), dtype=np.uint64), np.zeros(0, dtype=np.float32), empty)
    return ImageScan(*(np.concatenate([part[i] for part in parts]) for i in range(3)))


def _scan_batch(items: list[tuple[torch.Tensor, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image, _ in items]
    hashes = image_hashes(images)
    spread = np.array([image.float().flatten(1).std(dim=1).max().item() for image, _ in items], dtype=np.float32)
    side = (THUMB_SIDE, THUMB_SIDE)
    thumbs = np.stack([np.asarray(im.convert("L").resize(side, Image.Resampling.BOX)) for im in images])
    return hashes, spread, thumbs.reshape(-1, THUMB_SIDE, THUMB_SIDE)


def thumb_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two ``(8, 8)`` thumbnails, or of one and the other's mirror,
    whichever is smaller."""
    x, y = a.astype(np.float32), b.astype(np.float32)
    return float(min(np.abs(x - y).mean(), np.abs(x - y[:, ::-1]).mean()))


def _distances(block: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``(m, N)`` Hamming distances between ``(m,)`` and ``(N,)`` uint64 hashes."""
    x = np.bitwise_xor(block[:, None], others[None, :])  # (m, N) uint64
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int16)
    return _POPCOUNT8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int16)


def nearest_hashes(query: np.ndarray, reference: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each query image's closest reference image by perceptual hash, mirrors included.

    Args:
        query: ``(M, 2)`` uint64 from :func:`image_hashes`.
        reference: ``(N, 2)`` uint64, ``N >= 1``.
        block: Query rows compared at once.

    Returns:
        ``(M,)`` reference indices (the first of equals) and ``(M,)`` distances in bits.
    """
    index, distance = [], []
    for start in range(0, len(query), block):
        rows = query[start : start + block, 0]
        best = np.minimum(_distances(rows, reference[:, 0]), _distances(rows, reference[:, 1]))  # (m, N)
        index.append(best.argmin(axis=1))
        distance.append(best.min(axis=1))
    if not index:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int16)
    return np.concatenate(index), np.concatenate(distance)


def hash_pairs(
    hashes: np.ndarray, max_distance: int = MAX_DISTANCE, block: int = 1024, thumbs: np.ndarray | None = None
) -> list[HashPair]:
    """Every pair of images within ``max_distance`` bits, mirrors included (and, given ``thumbs``,
    whose thumbnails differ by at most :data:`THUMB_MAX_DIFF`).

    Args:
        hashes: ``(N, 2)`` uint64 from :func:`image_hashes`.
        max_distance: The most differing bits of a reported pair.
        block: Rows compared against all others at once.
        thumbs: ``(N, 8, 8)`` thumbnails from :func:`scan_images`, which confirm each pair.

    Returns:
        The pairs, ``a < b``, each once, closest first (ties by ``(a, b)``).
    """
    own, mirror = hashes[:, 0], hashes[:, 1]
    n = len(own)
    found: list[HashPair] = []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        direct = _distances(own[rows], own)  # (m, N)
        flipped = _distances(own[rows], mirror)  # (m, N): a against b's mirror
        best = np.minimum(direct, flipped)
        mask = (best <= max_distance) & (np.arange(n)[None, :] > rows[:, None])  # b > a: each pair once
        for i, j in zip(*np.nonzero(mask), strict=True):
            a = int(rows[i])
            if thumbs is not None and thumb_difference(thumbs[a], thumbs[j]) > THUMB_MAX_DIFF:
                continue
            found.append(HashPair(a, int(j), int(best[i, j]), bool(flipped[i, j] < direct[i, j])))
    return sorted(found, key=lambda p: (p.distance, p.a, p.b))
