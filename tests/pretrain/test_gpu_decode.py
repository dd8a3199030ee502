"""data.decode=gpu, everything but the CUDA call: what the workers send, the batched decode with its
fallbacks, the skip list, the wiring and the checks. torchvision's CPU JPEG decoder stands in for
nvJPEG; the lent GPU machines run the real one (bench/gpu_check.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from twinview.pretrain.config import load_config
from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.data.gpu_decode import (
    DeviceDecoder,
    EncodedImageFolder,
    centre_square,
    encoded_collate,
    read_for_device,
)
from twinview.pretrain.data.loaders import build_batches
from twinview.pretrain.data.sources import ImageFolderDataset, SkipLog
from twinview.pretrain.validate import ConfigError, World, validate

SIZE = 16


def _photo(path: Path, seed: int, mode: str = "RGB", fmt: str = "JPEG", w: int = 30, h: int = 22) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)  # smooth: JPEG keeps it
    img = Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _folder(root: Path) -> Path:
    for i in range(6):
        _photo(root / "a" / f"{i}.jpg", i)
    _photo(root / "b" / "png.png", 10, fmt="PNG")
    _photo(root / "b" / "cmyk.jpg", 11, mode="CMYK")
    _photo(root / "b" / "gray.jpg", 12, mode="L")
    return root


def _cpu_decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(decode_jpeg(data, mode=ImageReadMode.RGB))


def test_workers_send_plain_jpegs_as_bytes_and_decode_the_rest(tmp_path: Path) -> None:
    root = _folder(tmp_path / "img")
    plain = read_for_device(root / "a" / "0.jpg", SIZE)
    assert plain.dim() == 1 and plain.dtype == torch.uint8 and plain.numel() == (root / "a" / "0.jpg").stat().st_size
    assert read_for_device(root / "b" / "gray.jpg", SIZE).dim() == 1
    for name in ("png.png", "cmyk.jpg"):  # nvJPEG does not take these: decoded in the worker
        assert read_for_device(root / "b" / name, SIZE).shape == (3, SIZE, SIZE)
    rotated = root / "r.jpg"
    img = Image.open(root / "a" / "1.jpg")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(rotated, "JPEG", exif=exif.tobytes())
    assert read_for_device(rotated, SIZE).shape == (3, SIZE, SIZE)  # the EXIF rotation is the CPU's
    with pytest.raises(BadImage, match="not an image"):
        (tmp_path / "text.jpg").write_text("not a jpeg")
        read_for_device(tmp_path / "text.jpg", SIZE)


def test_centre_square_crops_the_middle_and_keeps_a_square_of_the_right_size() -> None:
    image = torch.zeros(3, 10, 16, dtype=torch.uint8)
    image[:, :, 3:13] = 200  # the centred 10 x 10 square
    assert torch.equal(centre_square(image, 10), torch.full((3, 10, 10), 200, dtype=torch.uint8))
    assert centre_square(image, 5).shape == (3, 5, 5)


def test_device_batches_match_the_cpu_path(tmp_path: Path) -> None:
    folder = ImageFolderDataset(_folder(tmp_path / "img"), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = encoded_collate([encoded[i] for i in range(len(encoded))])
    images, got_labels = DeviceDecoder(folder, torch.device("cpu"), _cpu_decode)(payloads, labels, indices)
    expected = torch.stack([folder[i][0] for i in range(len(folder))])
    assert images.shape == expected.shape == (9, 3, SIZE, SIZE)
    assert torch.equal(got_labels, torch.tensor(folder.index.labels))
    diff = (images.float() - expected.float()).abs()
    assert diff.mean() < 2.0 and diff.max() <= 40  # libjpeg vs PIL's decoder, bicubic on both sides


def test_a_rejected_file_falls_back_to_one_by_one_then_the_cpu(tmp_path: Path) -> None:
    folder = ImageFolderDataset(_folder(tmp_path / "img"), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = encoded_collate([encoded[i] for i in range(6)])
    rejected = payloads[2]
    calls = []

    def picky(data: list[torch.Tensor]) -> list[torch.Tensor]:  # nvJPEG refusing one file
        calls.append(len(data))
        if any(d is rejected for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return _cpu_decode(data)

    images, _ = DeviceDecoder(folder, torch.device("cpu"), picky)(payloads, labels, indices)
    assert calls == [6, 1, 1, 1, 1, 1, 1]  # the batch, then each file alone
    reference, _ = DeviceDecoder(folder, torch.device("cpu"), _cpu_decode)(payloads, labels, indices)
    assert (images.float() - reference.float()).abs().mean() < 2.0


def test_a_file_no_decoder_can_read_is_skipped_listed_and_replaced_by_the_next(tmp_path: Path) -> None:
    root = _folder(tmp_path / "img")
    bad = root / "a" / "5.jpg"  # the last of class a: its replacement is the first of class b
    cut = bad.read_bytes()[:-100]
    bad.write_bytes(cut)  # truncated: the header reads, the image data does not
    log = SkipLog(tmp_path / "skipped")
    folder = ImageFolderDataset(root, SIZE, skip_log=log)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = encoded_collate([encoded[i] for i in range(6)])
    assert int(indices[5]) == 5 and payloads[5].dim() == 1 and int(labels[5]) == 0  # passed the header check

    def strict_decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
        out = _cpu_decode(data)
        if any(d.numel() == len(cut) for d in data):
            raise RuntimeError("nvjpeg: bitstream error")
        return out

    images, got_labels = DeviceDecoder(folder, torch.device("cpu"), strict_decode)(payloads, labels, indices)
    assert images.shape[0] == 6
    assert list(log.collect()) == [str(bad)] and 5 in folder.bad
    replacement, label = folder[6]  # the next decodable item, decoded on the CPU, with its own label
    assert torch.equal(images[5], replacement) and int(got_labels[5]) == label == 1
    assert torch.equal(got_labels[:5], labels[:5])
    folder.strict = True
    with pytest.raises(BadImage, match=r"5\.jpg"):
        DeviceDecoder(folder, torch.device("cpu"), strict_decode)(payloads, labels, indices)


def test_build_batches_decodes_on_the_device_through_the_loader(tmp_path: Path) -> None:
    from accelerate import Accelerator

    root = _folder(tmp_path / "img")
    cfg = load_config(
        None,
        [f"data.path={root}", "data.decode=gpu", f"data.image_size={SIZE}", "data.num_workers=0", "train.batch_size=4"],
    )
    accelerator = Accelerator(cpu=True)
    batches = build_batches(cfg, accelerator, World(), SkipLog(tmp_path / "s")).prepare(accelerator)
    batches.decoder.decode_jpegs = _cpu_decode  # torchvision's nvJPEG path needs CUDA
    batches.set_epoch(0)
    got = list(batches)
    assert len(got) == len(batches) == 2 and all(
        x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.uint8 for x, _ in got
    )


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ([], World(device_type="cpu"), "needs|CUDA device"),
        (["data.cache=disk"], World(device_type="cuda"), "data.cache=disk"),
        (["data.path=hf:owner/name"], World(device_type="cuda"), "Hugging Face"),
    ],
)
def test_gpu_decoding_is_refused_where_it_cannot_work(overrides: list[str], world: World, message: str) -> None:
    cfg = load_config(None, ["data.path=/imgs", "data.decode=gpu", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)
    validate(load_config(None, ["data.path=/imgs", "data.decode=gpu"]), World(device_type="cuda"))
