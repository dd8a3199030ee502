"""The evaluation run: knn_only equals the kNN part of evaluate, sections equal their metric
functions on the same features, the feature cache is reused and renewed, and the input checks."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from twinview.augment.config import AugmentConfig, fill_recipe
from twinview.evaluate import features as features_module
from twinview.evaluate.config import EvalConfig
from twinview.evaluate.features import Embedder, extract_features, state_checksum
from twinview.evaluate.knn import knn_accuracy
from twinview.evaluate.metrics import retrieval_metrics
from twinview.evaluate.results import KnnResult
from twinview.evaluate.run import evaluate, knn_only
from twinview.pretrain.data.cache import cache_key
from twinview.pretrain.data.folder import ImageFolderDataset
from twinview.pretrain.data.source import scan_source

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EVAL = EvalConfig(knn_k=5, knn_temperature=0.1, batch_size=7)


def _embed(backbone: nn.Module, mean: tuple = MEAN, std: tuple = STD) -> Embedder:
    return Embedder(backbone, mean, std, batch_size=7, num_workers=0, device=torch.device("cpu"))


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _augment() -> AugmentConfig:
    augment = AugmentConfig()
    fill_recipe(augment)
    return augment


class MeanColourImages:
    """An in-memory LabelledImages: image i of class c is a flat image of colour ``colours[c]``."""

    def __init__(self, labels: list[int], colours: list[tuple[int, int, int]], image_size: int = 8) -> None:
        self.index = SimpleNamespace(
            root=Path("/in-memory"), labels=labels, classes=[str(c) for c in range(len(colours))], labeled=True
        )
        self.image_size, self.colours = image_size, colours

    def __len__(self) -> int:
        return len(self.index.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        c = self.index.labels[i]
        return torch.tensor(self.colours[c], dtype=torch.uint8).view(3, 1, 1).expand(
            3, self.image_size, self.image_size
        ).clone(), c

    def fingerprint(self) -> str:
        return f"{self.index.labels}:{self.colours}:{self.image_size}"


def test_knn_only_equals_the_knn_part_of_evaluate_and_the_metric_functions(image_folder: Path) -> None:
    train_set, test_set = (
        ImageFolderDataset(scan_source(image_folder), 24),
        ImageFolderDataset(scan_source(image_folder), 24),
    )
    backbone = _backbone()
    full = evaluate(_embed(backbone), train_set, test_set, EVAL, _augment())
    knn = knn_only(_embed(backbone), train_set, test_set, EVAL)
    assert knn == full.knn
    assert knn.num_reference == knn.num_query == 24 and knn.k == 5

    x, y = extract_features(backbone, train_set, MEAN, STD, batch_size=7, num_workers=0)
    expected = knn_accuracy(x, y, x, y, k=5, temperature=0.1)
    assert (knn.top1, knn.top5) == (expected["top1"], expected["top5"])
    assert full.retrieval == retrieval_metrics(x, y, x, y)
    assert full.backbone_unchanged and full.diagnostics.dims == 8
    assert 0.0 <= full.diagnostics.alignment <= 4.0 and 0.0 <= full.verification["roc_auc"] <= 1.0
    as_json = full.to_json()  # eval.json's layout
    assert (as_json["knn_top1"], as_json["num_train"], as_json["diagnostics"]["dims"]) == (knn.top1, 24, 8)


def test_any_labelled_images_work_and_separable_colours_score_one() -> None:
    # the backbone is the mean colour: every query's nearest references are of its own class
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    reference = MeanColourImages([0, 1, 2] * 4, colours)
    query = MeanColourImages([2, 1, 0, 0], colours)
    mean_colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    got = knn_only(_embed(mean_colour, (0.0,) * 3, (1.0,) * 3), reference, query, EvalConfig(knn_k=4))
    assert got == KnnResult(top1=1.0, top5=1.0, k=4, temperature=0.1, num_reference=12, num_query=4)


def test_features_are_cached_per_data_set_reused_and_renewed(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, backbone, cache = ImageFolderDataset(scan_source(image_folder), 24), _backbone(), tmp_path / "features"
    first = knn_only(_embed(backbone), dataset, dataset, EVAL, features_dir=cache)
    before = dataset.fingerprint()
    assert before == cache_key(dataset.index, 24)  # the decoded cache's key, as before
    key = hashlib.sha256(f"{before}:{state_checksum(backbone)!r}".encode()).hexdigest()[:16]
    assert [p.name for p in cache.iterdir()] == [f"images-{key}.pt"]  # the same set twice: one file

    calls: list[int] = []
    original = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert knn_only(_embed(backbone), dataset, dataset, EVAL, features_dir=cache) == first
    assert not calls  # read back, not extracted

    image = image_folder / "class_0" / "000.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # a changed file
    assert dataset.fingerprint() != before
    knn_only(_embed(backbone), dataset, dataset, EVAL, features_dir=cache)
    assert len(calls) == 1 and len(list(cache.iterdir())) == 2  # extracted once more, into a new file


def test_unlabeled_or_mismatched_sets_are_refused(image_folder: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(image_folder / "class_0" / "000.png", flat / "a.png")
    labelled, unlabeled = ImageFolderDataset(scan_source(image_folder), 24), ImageFolderDataset(scan_source(flat), 24)
    with pytest.raises(ValueError, match=r"query '.*flat' has no class sub-folders"):
        knn_only(_embed(_backbone()), labelled, unlabeled, EVAL)
    shutil.rmtree(image_folder / "class_2")
    fewer = ImageFolderDataset(scan_source(image_folder), 24)
    with pytest.raises(ValueError, match="class folders differ"):
        evaluate(_embed(_backbone()), fewer, labelled, EVAL, _augment())
