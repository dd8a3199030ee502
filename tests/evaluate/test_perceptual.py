"""Perceptual hashes: copies found without a model, against a brute-force pair loop."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from twinview.evaluate.perceptual import HashPair, hash_pairs, image_hash, image_hashes, scan_images, thumb_difference

pytest.importorskip("imagehash")


def _photo(seed: int, size: int = 96) -> Image.Image:
    """Smooth random structure (a low-resolution noise image scaled up), as photos have."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def _reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=50)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _bits(x: int) -> int:
    return bin(x).count("1")


def test_the_mirror_hash_is_the_hash_of_the_mirror_image() -> None:
    image = _photo(0)
    own, mirror = image_hash(image)
    assert image_hash(ImageOps.mirror(image)) == (mirror, own)
    assert own != mirror  # an asymmetric image


def test_pairs_equal_a_brute_force_loop_over_every_pair() -> None:
    images = [_photo(s) for s in range(40)]
    images += [ImageOps.mirror(images[0]), _reencoded(images[1]), images[2].resize((64, 64))]
    hashes = image_hashes(images)
    for max_distance in (0, 6, 10, 20):
        expected = []
        for a, b in itertools.combinations(range(len(images)), 2):
            direct = _bits(int(hashes[a, 0]) ^ int(hashes[b, 0]))
            flipped = _bits(int(hashes[a, 0]) ^ int(hashes[b, 1]))
            if min(direct, flipped) <= max_distance:
                expected.append(HashPair(a, b, min(direct, flipped), flipped < direct))
        expected.sort(key=lambda p: (p.distance, p.a, p.b))
        assert hash_pairs(hashes, max_distance, block=7) == expected  # blocks that do not divide N


def test_mirrored_reencoded_and_resized_copies_are_found_and_distinct_images_are_not() -> None:
    images = [_photo(s) for s in range(30)]
    copies = {30: 0, 31: 1, 32: 2}  # copy -> original
    images += [ImageOps.mirror(images[0]), _reencoded(images[1]), images[2].resize((64, 64))]
    pairs = hash_pairs(image_hashes(images))
    found = {(p.a, p.b) for p in pairs}
    assert {(o, c) for c, o in copies.items()} <= found
    assert next(p for p in pairs if p.b == 30).mirrored
    assert all(p.b in copies for p in pairs)  # no pair of two different images


def test_thumbnails_confirm_a_hash_match_or_reject_a_look_alike() -> None:
    images = [_photo(s) for s in range(6)]
    images += [ImageOps.mirror(images[0]), _reencoded(images[1])]
    items = [(torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous(), 0) for im in images]
    scan = scan_images(items, workers=0, batch=3)
    assert scan.hashes.shape == (8, 2) and scan.thumbs.shape == (8, 8, 8) and scan.pixel_std.shape == (8,)
    assert np.array_equal(scan.hashes, image_hashes(images))
    found = {(p.a, p.b) for p in hash_pairs(scan.hashes, thumbs=scan.thumbs)}
    assert found == {(0, 6), (1, 7)}  # the mirror and the re-encode, confirmed
    assert thumb_difference(scan.thumbs[0], scan.thumbs[6]) == 0.0  # a mirror compared mirrored
    look_alike = scan.hashes.copy()
    look_alike[2] = look_alike[3]  # same hash, different pictures
    assert (2, 3) in {(p.a, p.b) for p in hash_pairs(look_alike)}
    assert (2, 3) not in {(p.a, p.b) for p in hash_pairs(look_alike, thumbs=scan.thumbs)}
