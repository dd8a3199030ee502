"""Near-exact copies found without a model: perceptual hashes of each image and of its mirror.

A re-encoded, resized, slightly cropped or mirrored copy of a photo keeps its coarse structure, and
so its perceptual hash (within a few bits), however long or briefly a backbone was trained; an
embedding's cosine to its original depends on that training. The hash is ``imagehash``'s pHash
(Zauner, "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010, as
``imagehash.phash`` computes it): the image in grayscale at 32 x 32, its 2-D DCT, and one bit per
coefficient of the 8 x 8 lowest frequencies, set where it is above their median: 64 bits.

Two images are a pair when the Hamming distance between one's hash and the other's hash, or the
other's mirror's hash, is at most ``max_distance`` (imagededup's default for pHash is 10 of 64).
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
    """

    hashes: np.ndarray
    pixel_std: np.ndarray


def scan_images(dataset: Any, workers: int = 2, batch: int = 256) -> ImageScan:
    """Hashes and pixel spreads of a data set's ``(uint8 (3,S,S), label)`` items, in order, computed
    in DataLoader workers (any sized, indexable data set, e.g. a ``LabelledSubset``)."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_scan_batch)
    parts = list(loader)
    if not parts:
        return ImageScan(np.zeros((0, 2), dtype=np.uint64), np.zeros(0, dtype=np.float32))
    return ImageScan(np.concatenate([h for h, _ in parts]), np.concatenate([s for _, s in parts]))


def _scan_batch(items: list[tuple[torch.Tensor, int]]) -> tuple[np.ndarray, np.ndarray]:
    hashes = image_hashes(Image.fromarray(image.permute(1, 2, 0).numpy()) for image, _ in items)
    spread = np.array([image.float().flatten(1).std(dim=1).max().item() for image, _ in items], dtype=np.float32)
    return hashes, spread


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


def hash_pairs(hashes: np.ndarray, max_distance: int = MAX_DISTANCE, block: int = 1024) -> list[HashPair]:
    """Every pair of images within ``max_distance`` bits, mirrors included.

    Args:
        hashes: ``(N, 2)`` uint64 from :func:`image_hashes`.
        max_distance: The most differing bits of a reported pair.
        block: Rows compared against all others at once.

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
            found.append(HashPair(int(rows[i]), int(j), int(best[i, j]), bool(flipped[i, j] < direct[i, j])))
    return sorted(found, key=lambda p: (p.distance, p.a, p.b))
