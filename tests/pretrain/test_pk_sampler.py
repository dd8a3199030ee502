"""P x K batches: P distinct classes, K images of each, reproducible per epoch."""

from __future__ import annotations

from collections import Counter

import pytest

from twinview.pretrain.config import load_config
from twinview.pretrain.data.pk_sampler import PKBatchSampler
from twinview.pretrain.data.source import FOLDER, Source
from twinview.pretrain.data.survey import DataSurvey
from twinview.pretrain.validate import World, validate_data

LABELS = [0] * 10 + [1] * 6 + [2] * 2 + [3] * 8  # class 2 has fewer than K images


def test_every_batch_has_p_classes_with_k_images_each() -> None:
    sampler = PKBatchSampler(LABELS, classes_per_batch=3, samples_per_class=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(LABELS) // 12
    for batch in batches:
        counts = Counter(LABELS[i] for i in batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
        for c in counts:
            members = [i for i in batch if LABELS[i] == c]
            if LABELS.count(c) >= 4:
                assert len(set(members)) == 4  # without replacement where the class is big enough


def test_small_classes_are_sampled_with_replacement_and_all_classes_appear() -> None:
    sampler = PKBatchSampler(LABELS, classes_per_batch=2, samples_per_class=4, seed=1)
    seen: Counter = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for batch in sampler:
            seen.update(LABELS[i] for i in batch)
    assert set(seen) == {0, 1, 2, 3}  # uniform over classes: each drawn often


def test_same_seed_and_epoch_give_the_same_batches() -> None:
    a, b = PKBatchSampler(LABELS, 2, 4, seed=5), PKBatchSampler(LABELS, 2, 4, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_more_classes_per_batch_than_classes_is_an_error() -> None:
    cfg = load_config(None, ["data.path=x", "objective.name=supcon", "train.batch_size=10", "data.samples_per_class=2"])
    with pytest.raises(ValueError, match="needs 5 classes but the data has 4"):
        validate_data(cfg, World(), Source("x", FOLDER, survey=DataSurvey("x", len(LABELS), 4, ())))
