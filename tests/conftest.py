"""Shared fixtures: small image folders built by the tests, and the real CIFAR-10 when present."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Processes started with torch.multiprocessing.spawn unpickle their target by module name
# (tests.evaluate.test_...): the repository root must be importable in them, whatever ran before.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CIFAR_ARCHIVE = Path(os.environ.get("TWINVIEW_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps each session's twinview cache (digits, extracted archives) out of the user's home."""
    monkeypatch.setenv("TWINVIEW_CACHE", str(_session_cache(tmp_path_factory)))


_CACHE: list[Path] = []


def _session_cache(factory: pytest.TempPathFactory) -> Path:
    if not _CACHE:
        shared = os.environ.get("TWINVIEW_TEST_CACHE")
        _CACHE.append(Path(shared) if shared else factory.mktemp("twinview-cache"))
    return _CACHE[0]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 24, seed: int = 0) -> Path:
    """Writes a labelled folder ``root/class_i/NNN.png`` of images whose class is visible.

    Each class has its own base colour and a bright square at a class-specific corner, plus noise,
    so a kNN on even a random network can tell classes apart better than chance.
    """
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 31 + 160) % 256], dtype=np.float64)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255)
            q = size // 2
            y, x = (c % 2) * q, ((c // 2) % 2) * q
            img[y : y + q, x : x + q] = 255
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder of 3 classes x 8 images, 24x24 px."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 (``cifar10-jpeg/{train,test}/<class>/``), extracted once per session."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE} (only present on the project machines)")
    from twinview.pretrain.data.builtin import extract_archive

    return extract_archive(CIFAR_ARCHIVE, _session_cache(tmp_path_factory)) / "cifar10-jpeg"


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture
def wait_for_log_lines() -> Callable[[Path, int], None]:
    """``wait(path, n)``: waits (up to 3 minutes) until a run's metrics.jsonl has n lines, e.g.
    before signalling a training process that must be mid-run."""

    def wait(path: Path, lines: int) -> None:
        deadline = time.time() + 180
        while time.time() < deadline and _log_lines(path) < lines:
            time.sleep(0.02)
        assert _log_lines(path) >= lines, f"{path} did not reach {lines} lines in time"

    return wait


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary for the browser tests (tests/browser.py); they skip without one (.ci/run
    installs Debian's package in CI)."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    return found
