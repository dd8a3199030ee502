"""data.decode=gpu, everything but the CUDA call: what the workers send, the batched decode with its
fallbacks, the skip list, the wiring and the checks. torchvision's CPU JPEG decoder stands in for
nvJPEG; bench/gpu_check.py runs the real one on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from twinview.pretrain.config import load_config
from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.data.folder import ImageFolderDataset, SkipLog
from twinview.pretrain.data.gpu_decode import (
    DeviceDecoder,
    EncodedImageFolder,
    centre_square,
    encoded_collate,
    read_for_device,
    unpack,
)
from twinview.pretrain.data.loaders import build_batches
from twinview.pretrain.data.source import resolve_source, scan_source
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


def _batch(items: list[tuple[torch.Tensor, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch as the workers send it (packed by encoded_collate), unpacked as the decoder does."""
    return unpack(encoded_collate(items), SIZE)


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


def test_a_batch_travels_as_one_packed_tensor_and_unpacks_to_its_items(tmp_path: Path) -> None:
    folder = ImageFolderDataset(scan_source(_folder(tmp_path / "img")), SIZE)
    items = [EncodedImageFolder(folder)[i] for i in range(len(folder))]
    packed = encoded_collate(items)
    assert len(packed) == 5 and packed[0].dim() == 1  # five tensors whatever the batch size
    payloads, labels, indices = unpack(packed, SIZE)
    for (payload, _, _), got in zip(items, payloads, strict=True):
        assert got.shape == payload.shape and torch.equal(got, payload)
    assert labels.tolist() == [y for _, y, _ in items] and indices.tolist() == list(range(len(folder)))


FD_LIMITED = """
import resource, sys
from torch.utils.data import DataLoader
from twinview.pretrain.data.gpu_decode import EncodedImageFolder, encoded_collate
from twinview.pretrain.data.folder import ImageFolderDataset
from twinview.pretrain.data.source import scan_source
resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))
data = EncodedImageFolder(ImageFolderDataset(scan_source(sys.argv[1]), 8))
loader = DataLoader(data, batch_size=300, num_workers=2, collate_fn=encoded_collate, drop_last=True)
print(sum(len(batch[1]) - 1 for batch in loader))
"""


@pytest.mark.slow
def test_workers_send_large_batches_within_a_low_open_file_limit(tmp_path: Path) -> None:
    # one shared-memory file per payload tensor ran out of file descriptors ("Too many open files")
    # and hung the loader; the packed batch needs a handful per batch
    rng = np.random.default_rng(0)
    for i in range(600):
        (tmp_path / "img" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "img" / str(i % 2) / f"{i}.jpg"
        )
    done = subprocess.run(
        [sys.executable, "-c", FD_LIMITED, str(tmp_path / "img")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["600"]


def test_centre_square_crops_the_middle_and_keeps_a_square_of_the_right_size() -> None:
    image = torch.zeros(3, 10, 16, dtype=torch.uint8)
    image[:, :, 3:13] = 200  # the centred 10 x 10 square
    assert torch.equal(centre_square(image, 10), torch.full((3, 10, 10), 200, dtype=torch.uint8))
    assert centre_square(image, 5).shape == (3, 5, 5)


def test_device_batches_match_the_cpu_path(tmp_path: Path) -> None:
    folder = ImageFolderDataset(scan_source(_folder(tmp_path / "img")), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = _batch([encoded[i] for i in range(len(encoded))])
    images, got_labels = DeviceDecoder(folder, torch.device("cpu"), _cpu_decode).decode(payloads, labels, indices)
    expected = torch.stack([folder[i][0] for i in range(len(folder))])
    assert images.shape == expected.shape == (9, 3, SIZE, SIZE)
    assert torch.equal(got_labels, torch.tensor(folder.index.labels))
    diff = (images.float() - expected.float()).abs()
    assert diff.mean() < 2.0 and diff.max() <= 40  # libjpeg vs PIL's decoder, bicubic on both sides


def test_a_rejected_file_falls_back_to_one_by_one_then_the_cpu(tmp_path: Path) -> None:
    folder = ImageFolderDataset(scan_source(_folder(tmp_path / "img")), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = _batch([encoded[i] for i in range(6)])
    rejected = payloads[2]
    calls = []

    def picky(data: list[torch.Tensor]) -> list[torch.Tensor]:  # nvJPEG refusing one file
        calls.append(len(data))
        if any(d is rejected for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return _cpu_decode(data)

    images, _ = DeviceDecoder(folder, torch.device("cpu"), picky).decode(payloads, labels, indices)
    assert calls == [6, 1, 1, 1, 1, 1, 1]  # the batch, then each file alone
    reference, _ = DeviceDecoder(folder, torch.device("cpu"), _cpu_decode).decode(payloads, labels, indices)
    assert (images.float() - reference.float()).abs().mean() < 2.0


def test_a_truncated_jpeg_stays_with_the_cpu_decoder_in_the_worker(tmp_path: Path) -> None:
    root = _folder(tmp_path / "img")
    bad = root / "a" / "5.jpg"
    bad.write_bytes(bad.read_bytes()[:-100])  # no end-of-image marker: a hardware decoder may not notice
    log = SkipLog(tmp_path / "skipped")
    folder = ImageFolderDataset(scan_source(root), SIZE, skip_log=log)
    payload, label, index = EncodedImageFolder(folder)[5]
    assert payload.shape == (3, SIZE, SIZE)  # the replacement (a CMYK JPEG) was decoded in the worker
    assert index == 6 and label == 1 and list(log.collect()) == [str(bad)]  # skipped as on the CPU path


def test_a_file_no_decoder_can_read_is_skipped_listed_and_replaced_by_the_next(tmp_path: Path) -> None:
    root = _folder(tmp_path / "img")
    log = SkipLog(tmp_path / "skipped")
    folder = ImageFolderDataset(scan_source(root), SIZE, skip_log=log)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = _batch([encoded[i] for i in range(6)])
    # item 5 (the last of class a) as bytes that pass the worker's checks and that neither decoder reads
    broken = bytearray(payloads[5][:20].numpy().tobytes() + b"\x00garbage" * 8 + b"\xff\xd9")
    payloads[5] = torch.frombuffer(broken, dtype=torch.uint8)

    def nvjpeg(data: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(d is payloads[5] for d in data):
            raise RuntimeError("nvjpeg: bitstream error")
        return _cpu_decode(data)

    decoder = DeviceDecoder(folder, torch.device("cpu"), nvjpeg)
    with pytest.warns(UserWarning, match="nvJPEG could not decode"):
        images, got_labels = decoder.decode(payloads, labels, indices)
    assert images.shape[0] == 6 and decoder.rejected == {5}
    assert list(log.collect()) == [str(root / "a" / "5.jpg")] and 5 in folder.bad
    replacement, label = folder[6]  # the next decodable item, decoded on the CPU, with its own label
    assert torch.equal(images[5], replacement) and int(got_labels[5]) == label == 1
    assert torch.equal(got_labels[:5], labels[:5])
    images, _ = decoder.decode(payloads, labels, indices)  # known bad: straight to the replacement, logged once
    assert torch.equal(images[5], replacement) and len(log.collect()) == 1
    folder.strict, folder.bad = True, {}
    with pytest.raises(BadImage, match=r"5\.jpg"):
        DeviceDecoder(folder, torch.device("cpu"), nvjpeg).decode(payloads, labels, indices)


def test_out_of_memory_is_not_taken_for_a_bad_file(tmp_path: Path) -> None:
    folder = ImageFolderDataset(scan_source(_folder(tmp_path / "img")), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = _batch([encoded[i] for i in range(3)])

    def oom(data: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        DeviceDecoder(folder, torch.device("cpu"), oom).decode(payloads, labels, indices)


def test_build_batches_decodes_on_the_device_through_the_loader(tmp_path: Path) -> None:
    from accelerate import Accelerator

    root = _folder(tmp_path / "img")
    cfg = load_config(
        None,
        [f"data.path={root}", "data.decode=gpu", f"data.image_size={SIZE}", "data.num_workers=0", "train.batch_size=4"],
    )
    accelerator = Accelerator(cpu=True)
    source = resolve_source(str(root))
    batches = build_batches(cfg, source, accelerator, SkipLog(tmp_path / "s")).prepare(accelerator)
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
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, ["data.path=/imgs", "data.decode=gpu", *overrides]), world)
    validate(load_config(None, ["data.path=/imgs", "data.decode=gpu"]), World(device_type="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs it on a GPU)")
def test_nvjpeg_batches_match_the_cpu_path_on_a_gpu(tmp_path: Path) -> None:
    root = _folder(tmp_path / "img")
    _photo(root / "c" / "big.jpg", 20, w=300, h=200)  # resized on the device
    folder = ImageFolderDataset(scan_source(root), SIZE)
    encoded = EncodedImageFolder(folder)
    payloads, labels, indices = _batch([encoded[i] for i in range(len(encoded))])
    images, got = DeviceDecoder(folder, torch.device("cuda")).decode(payloads, labels, indices)
    assert images.device.type == "cuda" and got.device.type == "cuda"
    expected = torch.stack([folder[i][0] for i in range(len(folder))])
    assert (images.cpu().float() - expected.float()).abs().mean() < 3.0
    assert torch.equal(got.cpu(), labels)
