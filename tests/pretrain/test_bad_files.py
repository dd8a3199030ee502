"""Broken and unusual files: a clear reason for each bad one, conversion for the unusual ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twinview.pretrain.data.decode import BadImage, decode_image
from twinview.pretrain.data.folder import ImageFolderDataset, SkipLog
from twinview.pretrain.data.source import scan_source


def _rgb(path: Path, color: tuple[int, int, int] = (200, 30, 60), size: int = 16) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


BAD = {
    "zero-byte": (lambda p: p.write_bytes(b""), "empty file"),
    "text": (lambda p: p.write_text("this is not an image"), "not an image"),
    "truncated": (
        lambda p: p.write_bytes((_rgb(p.with_suffix(".full.jpg")).read_bytes())[:200]),
        "corrupt or truncated",
    ),
    "broken-link": (lambda p: p.symlink_to(p.parent / "missing.jpg"), "broken symbolic link"),
    "link-loop": (
        lambda p: (p.symlink_to(p.with_suffix(".other.jpg")), p.with_suffix(".other.jpg").symlink_to(p)),
        "symbolic link loop",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_give_a_reason(tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(BadImage, match=reason):
        decode_image(path, 8)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rgb(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels > limit
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(path, 8)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "locked.png")
    path.chmod(0)
    with pytest.raises(BadImage, match="permission denied"):
        decode_image(path, 8)


def test_permission_denied_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rgb(tmp_path / "locked.png")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", denied)  # what a chmod 000 file gives a non-root user
    with pytest.raises(BadImage, match="permission denied"):
        decode_image(path, 8)


def test_unusual_modes_become_rgb(tmp_path: Path) -> None:
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # red in CMYK
    r, g, b = decode_image(cmyk, 8)[4, 4]
    assert r > 200 and g < 60 and b < 60
    palette = tmp_path / "p.png"
    Image.new("RGB", (8, 8), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert tuple(decode_image(palette, 8)[0, 0]) == (10, 200, 10)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(rgba)  # fully transparent -> the white background
    assert tuple(decode_image(rgba, 8)[0, 0]) == (255, 255, 255)
    la = tmp_path / "la.png"
    Image.new("LA", (8, 8), (100, 255)).save(la)
    assert tuple(decode_image(la, 8)[0, 0]) == (100, 100, 100)
    sixteen = tmp_path / "16.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(sixteen)
    assert tuple(decode_image(sixteen, 8)[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 255))  # wide, left half red
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = decode_image(path, 10).astype(int)  # displayed 10 wide x 20 high, centre-cropped to 10 x 10
    # turned 90 degrees clockwise, the red left half is on top; unturned, red would be on the left
    assert out[1, 5, 0] > 200 and out[1, 5, 2] < 60
    assert out[8, 5, 2] > 200 and out[8, 5, 0] < 60


def test_dataset_skips_bad_files_keeps_batch_size_and_logs_reasons(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        _rgb(root / "a" / f"{i}.png")
        _rgb(root / "b" / f"{i}.png", (10, 10, 240))
    (root / "a" / "9-empty.jpg").write_bytes(b"")
    (root / "b" / "9-text.png").write_text("nope")
    log = SkipLog(tmp_path / "skipped")
    dataset = ImageFolderDataset(scan_source(root), 8, skip_log=log)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 8 and all(img.shape == (3, 8, 8) for img, _ in items)
    skipped = log.collect()
    assert {Path(p).name: r for p, r in skipped.items()} == {
        "9-empty.jpg": "empty file (0 bytes)",
        "9-text.png": "not an image (or a format PIL cannot read)",
    }
    strict = ImageFolderDataset(scan_source(root), 8, strict=True)
    with pytest.raises(BadImage, match=r"9-empty.jpg: empty file.*data.strict=true"):
        [strict[i] for i in range(len(strict))]


def test_file_list_with_labels_and_relative_paths(tmp_path: Path) -> None:
    _rgb(tmp_path / "cat.png")
    _rgb(tmp_path / "dog.png")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\ncat.png,cat\ndog.png,dog\n")
    dataset = ImageFolderDataset(scan_source(listing), 8)
    assert dataset.index.classes == ("cat", "dog") and [dataset[i][1] for i in range(2)] == [0, 1]
    plain = tmp_path / "list.txt"
    plain.write_text(f"{tmp_path / 'cat.png'}\n# a comment\ndog.png\n")
    assert (
        not ImageFolderDataset(scan_source(plain), 8).index.labeled
        and len(ImageFolderDataset(scan_source(plain), 8)) == 2
    )
