"""Image-folder source: walking, labels, decoding, resizing and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twinview.pretrain.data.builtin import materialize_digits, resolve_path
from twinview.pretrain.data.folder import ImageFolderDataset, load_image
from twinview.pretrain.data.source import UNLABELED, scan_folder, scan_source


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (10, 6), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 10, 30), "L": 128, "RGBA": (1, 2, 3, 4), "P": 5, "CMYK": (0, 0, 0, 0)}[mode]
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def test_walks_recursively_and_matches_extensions_in_any_case(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.JPG", fmt="JPEG")
    _save(tmp_path / "a" / "deep" / "y.png")
    _save(tmp_path / "b" / "z.Tif", fmt="TIFF")
    _save(tmp_path / "b" / "w.webp", fmt="WEBP")
    _save(tmp_path / "b" / "v.bmp", fmt="BMP")
    _save(tmp_path / "b" / "u.jpeg", fmt="JPEG")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    _save(tmp_path / ".hidden" / "h.png")
    index = scan_folder(tmp_path)
    names = [f.name for f in index.files]
    assert sorted(names) == sorted(["x.JPG", "y.png", "z.Tif", "w.webp", "v.bmp", "u.jpeg"])
    assert index.classes == ("a", "b")
    assert [index.classes[label] for label in index.labels] == [f.relative_to(tmp_path).parts[0] for f in index.files]


def test_images_at_the_top_level_mean_unlabeled(tmp_path: Path) -> None:
    _save(tmp_path / "top.png")
    _save(tmp_path / "cls" / "inner.png")
    index = scan_folder(tmp_path)
    assert not index.labeled and set(index.labels) == {UNLABELED}


def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(ValueError, match="no images under"):
        scan_folder(tmp_path / "empty")
    _save(tmp_path / "file.png")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "file.png")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_decodes_any_mode_to_rgb_uint8_of_fixed_size(tmp_path: Path, mode: str) -> None:
    path = _save(tmp_path / "i.png" if mode != "CMYK" else tmp_path / "i.jpg", mode=mode, size=(40, 20))
    img = load_image(path, 16)
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8


def test_resize_keeps_aspect_by_centre_crop(tmp_path: Path) -> None:
    # A 30x10 image: left third red, middle green, right third blue. Shorter side -> 10, crop centre.
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :10, 0] = 255
    arr[:, 10:20, 1] = 255
    arr[:, 20:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "s.png")
    img = load_image(tmp_path / "s.png", 10)
    assert img[1].float().mean() > 200 and img[0].float().mean() < 40 and img[2].float().mean() < 40


def test_dataset_returns_images_and_labels(image_folder: Path) -> None:
    ds = ImageFolderDataset(scan_source(image_folder), 16)
    assert len(ds) == 24
    img, label = ds[9]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 1


def test_builtin_digits_materialise_once_with_a_fixed_split() -> None:
    root = materialize_digits()
    assert resolve_path("builtin:digits") == root / "train"
    assert resolve_path("builtin:digits:test") == root / "test"
    train, test = scan_folder("builtin:digits"), scan_folder("builtin:digits:test")
    assert (len(train.files), len(test.files)) == (1497, 300)
    assert train.classes == tuple(str(i) for i in range(10)) == test.classes
    with Image.open(train.files[0]) as im:
        assert im.size == (32, 32)
    assert materialize_digits() == root  # second call reuses it
    with pytest.raises(ValueError, match="unknown built-in"):
        resolve_path("builtin:mnist")
