"""The results of an evaluation, typed: what ``twinview evaluate`` prints, puts in its report and
writes to ``eval.json``. Each result's ``to_json()`` gives that file's layout.

Metric tables whose names are data, not structure (retrieval's ``recall@K``, verification's
``tar@far=...``), stay ``dict[str, float]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KnnResult:
    """Weighted kNN of the queries against the reference set.

    Attributes:
        top1: Top-1 accuracy.
        top5: Top-5 accuracy.
        k: Neighbours that vote.
        temperature: Temperature of the ``exp(sim / T)`` vote weights.
        num_reference: Reference (memory) images.
        num_query: Query images.
    """

    top1: float
    top5: float
    k: int
    temperature: float
    num_reference: int
    num_query: int


@dataclass(frozen=True)
class ProbeResult:
    """A linear classifier trained on frozen features.

    Attributes:
        top1: Top-1 accuracy on the queries.
        top5: Top-5 accuracy on the queries.
        weight_decay: The weight decay chosen on a held-out part of the reference set.
        val_top1_by_weight_decay: Validation top-1 of each weight decay tried.
        epochs: Passes over the features per fit.
    """

    top1: float
    top5: float
    weight_decay: float
    val_top1_by_weight_decay: dict[str, float]
    epochs: int

    def to_json(self) -> dict[str, Any]:
        return {
            "probe_top1": self.top1,
            "probe_top5": self.top5,
            "weight_decay": self.weight_decay,
            "val_top1_by_weight_decay": self.val_top1_by_weight_decay,
            "epochs": self.epochs,
        }


@dataclass(frozen=True)
class Spread:
    """A distribution summarised: its mean and 5th, 50th and 95th percentiles."""

    mean: float
    p5: float
    p50: float
    p95: float


@dataclass(frozen=True)
class SimilarityStats:
    """How spread out embeddings are, on a seeded sample.

    Attributes:
        norm: L2 norms of the raw embeddings.
        cosine: Cosine similarity of every distinct pair.
        nn_cosine: Each item's similarity to its nearest other item.
    """

    norm: Spread
    cosine: Spread
    nn_cosine: Spread


@dataclass(frozen=True)
class Diagnostics:
    """Representation diagnostics of one backbone's features.

    Attributes:
        uniformity: Wang & Isola's uniformity (lower: spread over the sphere).
        effective_rank: RankMe, the entropy-based effective rank.
        dims: Feature width.
        collapse_warning: Why the features look collapsed, or None.
        alignment: Wang & Isola's alignment of two augmented views (lower: closer).
        similarity: Norm and similarity distributions (the label-free evaluation), or None.
    """

    uniformity: float
    effective_rank: float
    dims: int
    collapse_warning: str | None
    alignment: float
    similarity: SimilarityStats | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "similarity"}
        return out | (asdict(self.similarity) if self.similarity is not None else {})


@dataclass(frozen=True)
class Leaks:
    """Test images that are (near) copies of training images, and the scores without them.

    Attributes:
        test_images: Test images checked.
        leaked: Of those, near-duplicates of a training image.
        exact: Of those, byte-identical copies.
        csv: The file listing every leak (test image, training image, similarity, rule).
        threshold: Cosine from which a test image's nearest training image counts as its copy.
        hash_max_distance: Perceptual hashes within this many bits of 64 count too (-1: not hashed).
        knn_top1_without: kNN top-1 on the test images that did not leak (None: none is left).
        knn_top5_without: kNN top-5 on them.
        probe_top1_without: The linear probe's top-1 on them (None: no probe).
        warning: Said when more than 0.5 % of the test set leaked ("" otherwise).
    """

    test_images: int
    leaked: int
    exact: int
    csv: str
    threshold: float
    hash_max_distance: int
    knn_top1_without: float | None
    knn_top5_without: float | None
    probe_top1_without: float | None = None
    warning: str = ""


@dataclass(frozen=True)
class LabelledResult:
    """One backbone scored on a labelled reference / query pair.

    Attributes:
        knn: kNN top-1 / top-5.
        retrieval: Recall@K, precision@1 and MAP@R of the queries against the reference gallery.
        verification: ROC AUC, EER and TAR at a FAR on genuine and impostor query pairs.
        diagnostics: Uniformity, effective rank and view alignment of the query features.
        linear_probe: The probe, when asked for.
        plots: PNG files drawn (embedding map, neighbour grid, training curves).
        backbone_unchanged: The evaluation did not change the backbone's weights or buffers.
        leaks: Test images found in the training set, and the scores without them (None: not
            checked, e.g. for the random-init copy).
    """

    knn: KnnResult
    retrieval: dict[str, float]
    verification: dict[str, float]
    diagnostics: Diagnostics
    linear_probe: ProbeResult | None = None
    plots: tuple[str, ...] = ()
    backbone_unchanged: bool = True
    leaks: Leaks | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "knn_top1": self.knn.top1,
            "knn_top5": self.knn.top5,
            "k": self.knn.k,
            "temperature": self.knn.temperature,
            "num_train": self.knn.num_reference,
            "num_test": self.knn.num_query,
            "retrieval": self.retrieval,
            "verification": self.verification,
            "diagnostics": self.diagnostics.to_json(),
        }
        if self.linear_probe is not None:
            out["linear_probe"] = self.linear_probe.to_json()
        if self.plots:
            out["plots"] = list(self.plots)
        out["backbone_unchanged"] = self.backbone_unchanged
        if self.leaks is not None:
            out["leaks"] = {k: v for k, v in asdict(self.leaks).items() if k != "warning" or v}
        return out


@dataclass(frozen=True)
class DuplicatePairs:
    """Near-duplicate pairs of a source.

    Attributes:
        threshold: Cosine similarity from which two images count as near-duplicates.
        pairs: Pairs at or above it.
        exact: Of those, byte-identical copies.
        csv: The file listing every pair.
        top: The most similar pairs: ``(image A, image B, cosine, exact copy)``.
        mirror_invariant: Compared through mirror-invariant embeddings (a mirrored copy is found).
        warning: Why many pairs may be look-alikes rather than copies ("" when none).
        hash_max_distance: Perceptual hashes (of the image and its mirror) within this many bits of
            64 also make a pair (-1: not hashed).
        relative_closeness: Mutual nearest neighbours whose cosine goes this share of the way from
            both images' typical neighbour cosine to 1 also make a pair (0: not used).
        by_rule: Pairs per rule that found them (``hash``, ``cosine``, ``relative``; a pair found
            by several counts for each).
    """

    threshold: float
    pairs: int
    exact: int
    csv: str
    top: tuple[tuple[str, str, float, bool], ...]
    mirror_invariant: bool = False
    warning: str = ""
    hash_max_distance: int = -1
    relative_closeness: float = 0.0
    by_rule: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Outliers:
    """The images that look like nothing else, and the blank or tiny ones.

    Attributes:
        k: Uniqueness is ``1 - cosine`` to the ``k``-th nearest other image.
        csv: The file listing every image, most unusual first, with its flags.
        top: The most unusual images: ``(image, uniqueness, flags)``.
        near_constant: Images whose pixels hardly vary (blank, one colour).
        tiny: Files whose shorter side is under a quarter of the set's median.
    """

    k: int
    csv: str
    top: tuple[tuple[str, float, str], ...]
    near_constant: int = 0
    tiny: int = 0


@dataclass(frozen=True)
class ClusterSizes:
    """k-means clusters of a source.

    Attributes:
        k: Number of clusters.
        sizes: Images per cluster, largest first.
        csv: The file giving every image's cluster.
    """

    k: int
    sizes: tuple[int, ...]
    csv: str


@dataclass(frozen=True)
class LabelFreeResult:
    """The label-free evaluation of one source: the trained backbone against a random-init copy.

    Attributes:
        source: The images (a folder as an absolute path).
        num_images: Images embedded.
        skipped: Images that could not be decoded.
        backbones: ``pretrained`` (and ``random_init``) -> the diagnostics of its embeddings.
        duplicates: Near-duplicate pairs.
        clusters: k-means clusters.
        outliers: The most unusual images (None: not computed).
        plots: Figure name (``embeddings``, ``neighbours``, ``duplicates``, ...) -> PNG file.
        skipped_list: The file listing the images that could not be decoded ("" when none).
        explorer: The explorer page (``explorer.html``; "" when not written).
        map_method: What made the explorer's 2-D map.
    """

    source: str
    num_images: int
    skipped: int
    backbones: dict[str, Diagnostics]
    duplicates: DuplicatePairs
    clusters: ClusterSizes
    plots: dict[str, str] = field(default_factory=dict)
    skipped_list: str = ""
    outliers: Outliers | None = None
    explorer: str = ""
    map_method: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "num_images": self.num_images, "skipped": self.skipped}
        out |= {name: {"diagnostics": d.to_json()} for name, d in self.backbones.items()}
        out["duplicates"] = {k: v for k, v in asdict(self.duplicates).items() if k != "warning" or v}
        out["duplicates"]["top"] = [list(t) for t in self.duplicates.top]
        out["clusters"] = asdict(self.clusters) | {"sizes": list(self.clusters.sizes)}
        if self.outliers is not None:
            out["outliers"] = asdict(self.outliers) | {"top": [list(t) for t in self.outliers.top]}
        out["plots"] = dict(self.plots)
        if self.skipped_list:
            out["skipped_list"] = self.skipped_list
        if self.explorer:
            out["explorer"] = {"page": self.explorer, "map": self.map_method}
        return out


@dataclass(frozen=True)
class FinetuneScore:
    """One fine-tuned classifier (backbone and a fresh head) scored on the test set.

    Attributes:
        top1: Top-1 accuracy on the test images.
        top5: Top-5 accuracy.
        epochs: Passes over its labelled subset.
        steps: Optimiser steps.
        seconds: Training time (the test pass excluded).
    """

    top1: float
    top5: float
    epochs: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class BudgetResult:
    """Pretrained, from-scratch and linear-probe scores with one budget of labels.

    Attributes:
        labels: The budget as given (``"10%"``, ``"5/class"``).
        images: Labelled training images in its subset.
        pretrained: Fine-tuned from the pretrained backbone.
        scratch: The same recipe from a random init of the same architecture (None without the baseline).
        probe: A linear probe of the frozen pretrained features on the same subset (None without it).
    """

    labels: str
    images: int
    pretrained: FinetuneScore
    scratch: FinetuneScore | None = None
    probe: ProbeResult | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": self.labels, "images": self.images, "pretrained": asdict(self.pretrained)}
        if self.scratch is not None:
            out["scratch"] = asdict(self.scratch)
        if self.probe is not None:
            out["probe"] = {"top1": self.probe.top1, "top5": self.probe.top5, **self.probe.to_json()}
        return out


@dataclass(frozen=True)
class FinetuneResult:
    """``twinview finetune``: label efficiency of a pretrained backbone (``finetune.json``).

    Attributes:
        model: The run directory or export that was fine-tuned.
        backbone: Its timm architecture.
        train_images: Labelled training images available (the 100 % set).
        test_images: Test images scored.
        classes: Number of classes.
        settings: The fine-tuning recipe as printed in the start block.
        budgets: One result per label budget, smallest first.
        exported: Folder of the exported best fine-tuned model (None when not exported).
        exported_labels: The budget whose pretrained fine-tune was exported.
    """

    model: str
    backbone: str
    train_images: int
    test_images: int
    classes: int
    settings: dict[str, Any]
    budgets: tuple[BudgetResult, ...]
    exported: str | None = None
    exported_labels: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "budgets"}
        return out | {"budgets": [b.to_json() for b in self.budgets]}
