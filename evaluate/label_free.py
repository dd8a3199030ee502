"""Label-free analysis of a set of embeddings: near-duplicates, clusters, similarity statistics, neighbours.

The pieces of the unlabeled report, as pure functions of an ``(N, D)`` feature matrix (plus image
paths where a file is written). Similarities are cosine: features are L2-normalised first. Every
search against all ``N`` rows runs in chunks of rows, so memory is ``chunk x N``, never ``N x N``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans, MiniBatchKMeans

from twinview.evaluate.neighbours import NeighbourGraph, cross_topk, exact_others_topk, neighbour_graph, uses_faiss
from twinview.evaluate.results import SimilarityStats, Spread

FULL_KMEANS_MAX = 20000  # above this many rows, MiniBatchKMeans
KMEANS_INITS = 2  # k-means++ restarts of the full-batch KMeans (the best inertia wins; each costs a full fit)
MINIBATCH_INITS = 3  # and of MiniBatchKMeans
MINIBATCH_SIZE = 4096
AUTO_CLUSTERS = (2, 50)  # bounds of the automatic number of clusters
QUANTILE_SAMPLE_MAX = 5000  # 5000 items: 12.5M distinct pairs, within torch.quantile's 2^24 elements
HASH_BLOCK = 1 << 20  # bytes read at a time by file_digest


@dataclass(frozen=True)
class DuplicatePair:
    """Two images whose embeddings are (nearly) the same.

    Attributes:
        a: Index of the first image (``a < b``).
        b: Index of the second image.
        similarity: Cosine similarity of their embeddings.
        exact: The two files have the same bytes (set by :func:`mark_exact`).
        rule: What found the pair, ``+``-joined in this order: ``hash`` (perceptual hashes within
            a few bits), ``cosine`` (embeddings at or above the threshold), ``relative`` (mutual
            nearest neighbours far closer than either's other neighbours).
        hash_distance: Bits between their perceptual hashes (-1: not hashed).
    """

    a: int
    b: int
    similarity: float
    exact: bool = False
    rule: str = "cosine"
    hash_distance: int = -1


@dataclass(frozen=True)
class Clusters:
    """A k-means partition of the embeddings, clusters numbered by size.

    Attributes:
        labels: ``(N,)`` int64 cluster of each item; cluster 0 is the largest.
        sizes: Items per cluster, ``sizes[i]`` for cluster ``i`` (non-increasing; no empty cluster).
        central: Per cluster, the indices of its (up to ``central``) members most cosine-similar to
            its centre, closest first.
    """

    labels: torch.Tensor
    sizes: list[int]
    central: list[list[int]]


def near_duplicates(
    features: torch.Tensor,
    threshold: float,
    k: int = 10,
    chunk: int | None = None,
    graph: NeighbourGraph | None = None,
) -> list[DuplicatePair]:
    """Pairs of items whose embeddings have cosine similarity ``>= threshold``.

    An exact search, but only among each item's ``k`` nearest others: a pair is found when one of
    its items is among the other's ``k`` nearest. That bounds the cost (``N x k`` candidates, and
    memory ``chunk x N`` however many pairs pass the threshold), at the price that a group of more
    than ``k + 1`` identical images is reported partially (each member pairs with only ``k`` of the
    others), which still shows every such image as a duplicate.

    Args:
        features: ``(N, D)`` embeddings.
        threshold: The least cosine similarity of a reported pair.
        k: Neighbours of each item that are considered.
        chunk: Rows per block of an exact search (see :func:`~twinview.evaluate.neighbours.neighbour_graph`).
        graph: The features' neighbour graph with at least ``k`` neighbours, if already searched.

    Returns:
        The pairs, ``a < b``, each once, most similar first (ties by ``(a, b)``); the similarity of
        a pair found from both sides is the larger of the two (they differ by rounding at most).

    Raises:
        ValueError: If ``k`` or ``chunk`` is below 1.
    """
    if k < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"k and chunk must be at least 1 (got k={k}, chunk={chunk}).")
    n = features.shape[0]
    if n < 2:
        return []
    idx, sim = (graph or neighbour_graph(features, k, chunk)).first(min(k, n - 1))  # (N, k)
    keep = sim >= threshold
    rows = torch.arange(n, device=idx.device)[:, None].expand_as(idx)[keep]  # (P,)
    cols, sims = idx[keep], sim[keep]
    a, b = torch.minimum(rows, cols), torch.maximum(rows, cols)
    keys, inverse = torch.unique(a * n + b, return_inverse=True)  # sorted: by (a, b)
    best = torch.full((len(keys),), float("-inf"), device=idx.device).scatter_reduce(0, inverse, sims, "amax")
    order = best.sort(descending=True, stable=True).indices  # ties keep (a, b) order
    keys, best = keys[order].cpu(), best[order].cpu()
    return [
        DuplicatePair(int(key) // n, int(key) % n, float(s))
        for key, s in zip(keys.tolist(), best.tolist(), strict=True)
    ]


RELATIVE_K = 10  # neighbours whose median is an image's typical neighbour similarity
# How much of the way from an image's typical neighbour cosine t to 1 a relative pair's cosine s
# must go, (s - t) / (1 - t), for both images. Measured on Imagewoof-96 val with 30 planted copies of
# each of five kinds (docs/BENCHMARKS.md): 0.7 finds all mirrors and re-encodes with a 2-step and a
# 30-epoch model, 29 of 30 90 % crops with the latter, and 7-8 other pairs, where the fixed cosine
# 0.985 reports 1,349 other pairs with the 2-step model.
RELATIVE_CLOSENESS = 0.7
# ... and at least this far above it in cosine: where a model maps everything near everything
# (typical cosine 0.9999, the demo's few steps), the ratio above is noise.
RELATIVE_MIN_GAP = 0.01
RULES = ("hash", "cosine", "relative")


def _closeness(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(s - t) / (1 - t)``: how much of the way from a typical cosine ``t`` to 1 a cosine ``s``
    goes; 0 where ``s - t`` is under :data:`RELATIVE_MIN_GAP`."""
    return torch.where(s - t >= RELATIVE_MIN_GAP, (s - t) / (1 - t).clamp_min(1e-6), torch.zeros_like(s))


def relative_duplicates(
    features: torch.Tensor,
    closeness: float = RELATIVE_CLOSENESS,
    k: int = RELATIVE_K,
    chunk: int | None = None,
    graph: NeighbourGraph | None = None,
) -> list[DuplicatePair]:
    """Pairs of mutual nearest neighbours whose similarity stands far above each one's typical
    neighbour similarity: a copy's cosine to its original depends on how well the model was
    trained, but it stands out from the image's other neighbours either way.

    For image ``i`` with nearest other image ``j`` (cosine ``s``), the pair is reported when ``i``
    is also ``j``'s nearest and ``(s - t) / (1 - t) >= closeness`` (and ``s - t >= 0.01``) for
    both, ``t`` being the median cosine of the
    image's 2nd to ``k+1``-th nearest others.

    Args:
        features: ``(N, D)`` embeddings (``N >= 3``; fewer: no pairs).
        closeness: The least share of the way from the typical cosine to 1, for both images.
        k: Neighbours behind the nearest that give the typical similarity.
        chunk: Rows per block of an exact search (see :func:`~twinview.evaluate.neighbours.neighbour_graph`).
        graph: The features' neighbour graph with at least ``k + 1`` neighbours, if already searched.

    Returns:
        The pairs, ``a < b``, most similar first, ``rule="relative"``.
    """
    n = features.shape[0]
    if n < 3:
        return []
    idx, sim = (graph or neighbour_graph(features, k + 1, chunk)).first(min(k + 1, n - 1))  # (N, k+1)
    nearest, best = idx[:, 0], sim[:, 0]  # (N,)
    typical = sim[:, 1:].median(dim=1).values  # (N,)
    rows = torch.arange(n, device=idx.device)
    mutual = (nearest[nearest] == rows) & (rows < nearest)  # each pair once, from its smaller index
    stands_out = (_closeness(best, typical) >= closeness) & (_closeness(best, typical[nearest]) >= closeness)
    keep = (mutual & stands_out).nonzero().flatten()
    order = best[keep].sort(descending=True, stable=True).indices
    keep = keep[order].cpu()
    return [DuplicatePair(int(i), int(nearest[i]), float(best[i]), rule="relative") for i in keep.tolist()]


def merge_pairs(features: torch.Tensor, *found: Sequence[DuplicatePair]) -> list[DuplicatePair]:
    """One pair per image pair from several rules: the rules joined, the hash distance kept, the
    cosine of the (normalised) embeddings filled in where a rule had none; most similar first.

    Args:
        features: ``(N, D)`` embeddings, for the cosine of pairs found by hashes alone.
        found: Pair lists of the rules (``rule`` and, for hashes, ``hash_distance`` set).
    """
    merged: dict[tuple[int, int], DuplicatePair] = {}
    for pairs in found:
        for p in pairs:
            key = (p.a, p.b)
            if key not in merged:
                merged[key] = p
                continue
            q = merged[key]
            rules = sorted(set(q.rule.split("+")) | set(p.rule.split("+")), key=RULES.index)
            merged[key] = replace(
                q,
                rule="+".join(rules),
                similarity=max(q.similarity, p.similarity),
                hash_distance=max(q.hash_distance, p.hash_distance),
            )
    x = F.normalize(features.float(), dim=1)
    out = [replace(p, similarity=float(x[p.a] @ x[p.b])) if math.isnan(p.similarity) else p for p in merged.values()]
    return sorted(out, key=lambda p: (-p.similarity, p.a, p.b))


OUTLIER_K = 10  # uniqueness: distance to this nearest other image
NEAR_CONSTANT_STD = 4.0  # pixel standard deviation (0-255) under which an image counts as blank / one colour
TINY_FRACTION = 0.25  # a file whose shorter side is under this fraction of the set's median is flagged tiny


def uniqueness(
    features: torch.Tensor, k: int = OUTLIER_K, chunk: int | None = None, graph: NeighbourGraph | None = None
) -> torch.Tensor:
    """Each image's distance to its ``k``-th nearest other image, ``1 - cosine`` (in [0, 2]): high
    for images that look like nothing else (FiftyOne Brain's uniqueness and fastdup's outliers rank
    images the same way). The ``k``-th rather than the nearest neighbour, so that an image with a
    few near-copies is not hidden by them.

    Args:
        features: ``(N, D)`` embeddings, ``N >= 2`` (``k`` is capped at ``N - 1``).
        k: Which neighbour.
        chunk: Rows per block of an exact search (see :func:`~twinview.evaluate.neighbours.neighbour_graph`).
        graph: The features' neighbour graph with at least ``k`` neighbours, if already searched.

    Returns:
        ``(N,)`` float32 on the CPU.
    """
    n = features.shape[0]
    _, sim = (graph or neighbour_graph(features, k, chunk)).first(min(k, n - 1))  # (N, k)
    return (1 - sim[:, -1]).cpu()


def outlier_flags(pixel_std: float, size: tuple[int, int] | None, typical_side: float) -> str:
    """``near-constant`` (a pixel standard deviation under :data:`NEAR_CONSTANT_STD`), ``tiny`` (a
    shorter side under :data:`TINY_FRACTION` of ``typical_side``, the set's median shorter side),
    both ``+``-joined, or ``""``."""
    flags = []
    if pixel_std < NEAR_CONSTANT_STD:
        flags.append("near-constant")
    if size is not None and 0 < min(size) < TINY_FRACTION * typical_side:
        flags.append("tiny")
    return "+".join(flags)


def write_outliers_csv(
    scores: torch.Tensor, flags: Sequence[str], names: Sequence[str], path: str | Path, k: int = OUTLIER_K
) -> tuple[Path, list[int]]:
    """Writes every image, most unusual first: ``path,uniqueness,flags``.

    Returns:
        ``path``, and the row order written (most unusual first; ties by index).
    """
    order = sorted(range(len(names)), key=lambda i: (-float(scores[i]), i))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", f"uniqueness_k{k}", "flags"])
        writer.writerows([names[i], f"{float(scores[i]):.4f}", flags[i]] for i in order)
    return path, order


LEAK_WARN_FRACTION = 0.005  # warn when more of the test set than this is in the training set


@dataclass(frozen=True)
class Leak:
    """A test image that is (nearly) a training image.

    Attributes:
        test: Index of the test image.
        train: Index of the training image it copies.
        similarity: Cosine similarity of their embeddings.
        rule: ``hash``, ``cosine`` or both (``+``-joined), as for near-duplicates.
        hash_distance: Bits between their perceptual hashes (-1: not hashed).
    """

    test: int
    train: int
    similarity: float
    rule: str
    hash_distance: int = -1


def find_leaks(
    train: torch.Tensor,
    test: torch.Tensor,
    threshold: float,
    hashes: tuple[np.ndarray, np.ndarray] | None = None,
    max_distance: int = 10,
    thumbs: tuple[np.ndarray, np.ndarray] | None = None,
    closeness: float = RELATIVE_CLOSENESS,
    k: int = RELATIVE_K,
    chunk: int | None = None,
) -> list[Leak]:
    """Test images that are near-duplicates of training images, by either of two rules:

    * ``hash`` (given ``hashes``): the training image with the closest perceptual hash (or mirror
      hash) is within ``max_distance`` bits and, given ``thumbs``, their thumbnails differ by at most
      :data:`~twinview.evaluate.perceptual.THUMB_MAX_DIFF` (why: :mod:`~twinview.evaluate.perceptual`).
    * ``cosine``: the nearest training image is at cosine ``s >= threshold`` and stands out from
      the test image's typical training-neighbour cosine ``t`` (the median of its 2nd to
      ``k+1``-th nearest): ``(s - t) / (1 - t) >= closeness``, so that a briefly trained model,
      which puts everything near everything, does not flag all.

    Args:
        train: ``(N, D)`` training embeddings.
        test: ``(M, D)`` test embeddings.
        threshold: The least cosine of a leak found by its embedding.
        hashes: ``(train (N, 2), test (M, 2))`` uint64 from :func:`~twinview.evaluate.perceptual.image_hashes`.
        max_distance: The most differing bits of a leak found by its hash.
        thumbs: ``(train (N, 8, 8), test (M, 8, 8))`` thumbnails that confirm a hash match.
        closeness: The least share of the way from the typical cosine to 1 of a cosine leak.
        k: Neighbours that give the typical cosine.
        chunk: Test rows per block of an exact search (memory ``chunk x N``; faiss from
            :data:`~twinview.evaluate.neighbours.FAISS_MIN_ROWS` training rows, where installed).

    Returns:
        One leak per leaked test image, in test order: with the training image whose hash matched
        when that rule did (``rule`` adds ``cosine`` when the cosine rule holds for it too), else
        with the nearest training image by cosine.
    """
    from twinview.evaluate.perceptual import THUMB_MAX_DIFF, nearest_hashes, thumb_difference

    a = F.normalize(train.float(), dim=1)  # (N, D)
    b = F.normalize(test.float(), dim=1)  # (M, D)
    top = min(k + 1, len(a))
    idx, sims = cross_topk(b, a, top, chunk)  # (M, top)
    idx, sims = idx.cpu(), sims.cpu()
    typical = sims[:, 1:].median(dim=1).values if top > 1 else torch.full((len(b),), -2.0)  # (M,)
    if hashes is not None:
        hash_idx, hash_dist = nearest_hashes(hashes[1], hashes[0])
    leaks = []
    for i in range(len(b)):
        by_cosine = bool(sims[i, 0] >= threshold) and float(_closeness(sims[i, 0], typical[i])) >= closeness
        by_hash = hashes is not None and int(hash_dist[i]) <= max_distance
        if by_hash and thumbs is not None:
            by_hash = thumb_difference(thumbs[1][i], thumbs[0][int(hash_idx[i])]) <= THUMB_MAX_DIFF
        if by_hash:  # the closer evidence of a copy: the image whose hash matches
            j = int(hash_idx[i])
            sim = float(a[j] @ b[i])
            rule = "hash+cosine" if by_cosine and j == int(idx[i, 0]) else "hash"
            leaks.append(Leak(i, j, sim, rule, int(hash_dist[i])))
        elif by_cosine:
            j = int(idx[i, 0])
            distance = int(_hamming(hashes[1][i], hashes[0][j])) if hashes is not None else -1
            leaks.append(Leak(i, j, float(sims[i, 0]), "cosine", distance))
    return leaks


def _hamming(x: np.ndarray, y: np.ndarray) -> int:
    """Bits between a hash pair and another's own or mirror hash, the smaller."""
    return min(bin(int(x[0]) ^ int(y[0])).count("1"), bin(int(x[0]) ^ int(y[1])).count("1"))


def write_leaks_csv(
    leaks: Sequence[Leak], train_names: Sequence[str], test_names: Sequence[str], exact: Sequence[bool], path: Path
) -> Path:
    """Writes ``test_image,train_image,similarity,exact,rule,hash_distance``, one row per leak."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test_image", "train_image", "similarity", "exact", "rule", "hash_distance"])
        writer.writerows(
            [
                test_names[x.test],
                train_names[x.train],
                f"{x.similarity:.4f}",
                "true" if same else "false",
                x.rule,
                "" if x.hash_distance < 0 else x.hash_distance,
            ]
            for x, same in zip(leaks, exact, strict=True)
        )
    return path


def mark_exact(pairs: Sequence[DuplicatePair], digest: Callable[[int], str]) -> list[DuplicatePair]:
    """The pairs with ``exact=True`` where both items have the same digest.

    Args:
        pairs: Pairs from :func:`near_duplicates`.
        digest: Digest of an item's file (e.g. ``lambda i: file_digest(paths[i])``); called once
            per index.

    Returns:
        The same pairs in the same order, ``exact`` set.
    """
    cache: dict[int, str] = {}

    def cached(i: int) -> str:
        if i not in cache:
            cache[i] = digest(i)
        return cache[i]

    return [replace(p, exact=cached(p.a) == cached(p.b)) for p in pairs]


def file_digest(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks of ``HASH_BLOCK`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_duplicates_csv(pairs: Sequence[DuplicatePair], names: Sequence[str], path: str | Path) -> Path:
    """Writes the pairs as CSV: ``path_a,path_b,similarity,exact,rule,hash_distance``.

    Args:
        pairs: The pairs, written in their order.
        names: Name (path) of each item, by index.
        path: The CSV file (its folder is created).

    Returns:
        ``path``. Similarities have 4 decimals; ``exact`` is ``true`` or ``false``; ``rule`` says
        which rules found the pair (see :class:`DuplicatePair`); ``hash_distance`` is empty where
        the images were not hashed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path_a", "path_b", "similarity", "exact", "rule", "hash_distance"])
        writer.writerows(
            [
                names[p.a],
                names[p.b],
                f"{p.similarity:.4f}",
                "true" if p.exact else "false",
                p.rule,
                "" if p.hash_distance < 0 else p.hash_distance,
            ]
            for p in pairs
        )
    return path


def auto_num_clusters(n: int) -> int:
    """``round(sqrt(n / 2))`` (the rule of thumb of Mardia et al.), clamped to ``AUTO_CLUSTERS`` and ``<= n``."""
    low, high = AUTO_CLUSTERS
    return min(n, max(low, min(high, round(math.sqrt(n / 2)))))


def _kmeans_labels(x: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means labels of the rows of ``x`` (seeded)."""
    if uses_faiss(len(x)):  # scikit-learn's mini-batches take minutes at a million rows; faiss seconds
        return _faiss_kmeans_labels(x, num_clusters, seed)
    # Full-batch Lloyd iterations cost N x K x D per step and per restart; up to ~20k rows that is
    # cheap and gives the best partition. Above, mini-batches reach nearly the same inertia in a
    # fraction of the time and memory.
    if len(x) <= FULL_KMEANS_MAX:
        model: KMeans | MiniBatchKMeans = KMeans(num_clusters, n_init=KMEANS_INITS, random_state=seed)
    else:
        model = MiniBatchKMeans(num_clusters, batch_size=MINIBATCH_SIZE, n_init=MINIBATCH_INITS, random_state=seed)
    return model.fit_predict(x)


def _faiss_kmeans_labels(x: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """faiss's k-means (Lloyd on a sample of at most 256 rows per centroid, the best of
    :data:`MINIBATCH_INITS` seeded runs), then every row's nearest centroid."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], num_clusters, niter=20, nredo=MINIBATCH_INITS, seed=seed, verbose=False)
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def _by_size(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Labels renumbered so that cluster 0 is the largest (ties: the one whose first member comes first).

    Empty clusters are dropped, so the labels are ``0 .. C-1`` for the C non-empty ones.
    """
    n = len(labels)
    sizes = torch.bincount(labels, minlength=num_clusters)  # (K,)
    first = torch.full((num_clusters,), n, dtype=torch.long).scatter_reduce(0, labels, torch.arange(n), "amin")
    order = first.sort(stable=True).indices  # by first member ...
    order = order[sizes[order].sort(descending=True, stable=True).indices]  # ... then by size
    order = order[sizes[order] > 0]
    rank = torch.empty(num_clusters, dtype=torch.long)
    rank[order] = torch.arange(len(order))
    return rank[labels]


def _central_members(x: torch.Tensor, labels: torch.Tensor, sizes: list[int], central: int) -> list[list[int]]:
    """Per cluster, its up to ``central`` members most cosine-similar to the mean of its members, closest first.

    Args:
        x: ``(N, D)`` L2-normalised features.
        labels: ``(N,)`` clusters ``0 .. C-1``.
        sizes: Members per cluster.
        central: Members kept per cluster.
    """
    centres = torch.zeros(len(sizes), x.shape[1], dtype=x.dtype).index_add_(0, labels, x)  # (C, D)
    centres = F.normalize(centres, dim=1)  # the mean's direction: only the cosine matters
    score = (x * centres[labels]).sum(dim=1)  # (N,) cosine to its own centre
    order = score.sort(descending=True, stable=True).indices  # ties: lower index first
    order = order[labels[order].sort(stable=True).indices]  # grouped by cluster, closest first
    return [members[:central].tolist() for members in order.split(sizes)]


def cluster(features: torch.Tensor, num_clusters: int | None = None, seed: int = 0, central: int = 8) -> Clusters:
    """k-means (scikit-learn) of the L2-normalised embeddings.

    Args:
        features: ``(N, D)`` embeddings.
        num_clusters: Clusters K; None picks :func:`auto_num_clusters` (``round(sqrt(N / 2))``,
            between 2 and 50, at most N).
        seed: Seed of the k-means initialisation.
        central: Members listed per cluster in :attr:`Clusters.central`.

    Returns:
        The clusters, renumbered by size (largest first). A cluster k-means leaves empty (fewer
        distinct embeddings than K) is dropped, so there may be fewer than K.

    Raises:
        ValueError: Without features, or with K outside ``[1, N]``.
    """
    n = features.shape[0]
    if n == 0:
        raise ValueError("clustering needs at least one embedding.")
    k = auto_num_clusters(n) if num_clusters is None else num_clusters
    if not 1 <= k <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] (got {k}).")
    x = F.normalize(features.detach().float().cpu(), dim=1)  # (N, D)
    raw = torch.from_numpy(_kmeans_labels(x.numpy(), k, seed).astype(np.int64))
    labels = _by_size(raw, k)
    sizes = torch.bincount(labels).tolist()
    return Clusters(labels, sizes, _central_members(x, labels, sizes, central))


def write_clusters_csv(clusters: Clusters, names: Sequence[str], path: str | Path) -> Path:
    """Writes each item's cluster as CSV: ``path,cluster``, in item order; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "cluster"])
        writer.writerows(zip(names, clusters.labels.tolist(), strict=True))
    return path


def _sample(features: torch.Tensor, sample: int, seed: int) -> torch.Tensor:
    """Up to ``sample`` rows drawn without replacement (seeded), as float32 on the CPU."""
    if not 2 <= sample <= QUANTILE_SAMPLE_MAX:
        raise ValueError(f"sample must be in [2, {QUANTILE_SAMPLE_MAX}] (got {sample}).")
    if features.shape[0] < 2:
        raise ValueError("similarity statistics need at least two embeddings.")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(features.shape[0], generator=g)[:sample]
    return features.detach()[pick.to(features.device)].float().cpu()


def _cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """``(S, S)`` cosine similarities of the rows."""
    x = F.normalize(features, dim=1)
    return x @ x.T


def _distinct_pairs(sims: torch.Tensor) -> torch.Tensor:
    """The ``S (S - 1) / 2`` entries above the diagonal of an ``(S, S)`` matrix."""
    i, j = torch.triu_indices(len(sims), len(sims), offset=1)
    return sims[i, j]


def pairwise_cosines(features: torch.Tensor, sample: int = 2000, seed: int = 0) -> torch.Tensor:
    """Cosine similarity of every distinct pair of a seeded sample of the embeddings.

    Args:
        features: ``(N, D)`` embeddings, ``N >= 2``.
        sample: Items drawn (without replacement; all when ``N <= sample``), at most
            ``QUANTILE_SAMPLE_MAX`` so the pairs fit :func:`torch.quantile`.
        seed: Seed of the draw.

    Returns:
        ``(S (S - 1) / 2,)`` float32 similarities, ``S = min(N, sample)``.
    """
    return _distinct_pairs(_cosine_matrix(_sample(features, sample, seed)))


def _summary(values: torch.Tensor) -> Spread:
    """Mean and the 5th, 50th and 95th percentiles (linear interpolation)."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return Spread(v.mean().item(), q[0], q[1], q[2])


def similarity_stats(features: torch.Tensor, sample: int = 2000, seed: int = 0) -> SimilarityStats:
    """How spread out the embeddings are, on a seeded sample (the one :func:`pairwise_cosines` draws).

    Args:
        features: ``(N, D)`` embeddings, ``N >= 2``.
        sample: Items drawn (see :func:`pairwise_cosines`).
        seed: Seed of the draw.

    Returns:
        ``norm`` (L2 norms of the raw embeddings), ``cosine`` (cosine similarity of every distinct
        pair) and ``nn_cosine`` (each item's similarity to its nearest other item in the sample),
        each as ``mean``, ``p5``, ``p50`` and ``p95``.
    """
    x = _sample(features, sample, seed)  # (S, D)
    sims = _cosine_matrix(x)  # (S, S)
    others = sims.clone().fill_diagonal_(float("-inf"))
    return SimilarityStats(
        norm=_summary(x.norm(dim=1)),
        cosine=_summary(_distinct_pairs(sims)),
        nn_cosine=_summary(others.max(dim=1).values),
    )


def self_neighbours(
    features: torch.Tensor, queries: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k nearest other items of the same set (never itself), by cosine similarity.

    Args:
        features: ``(N, D)`` embeddings.
        queries: ``(Q,)`` long indices of the queries into ``features``.
        k: Neighbours per query, capped at ``N - 1``.
        chunk: Queries per block (memory ``chunk x N``; None: as :func:`near_duplicates`).

    Returns:
        ``(Q, k)`` long indices and ``(Q, k)`` float32 similarities, most similar first, on the
        features' device.

    Raises:
        ValueError: If ``k`` or ``chunk`` is below 1, or there are fewer than two items.
    """
    if k < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"k and chunk must be at least 1 (got k={k}, chunk={chunk}).")
    n = features.shape[0]
    if n < 2:
        raise ValueError("neighbours need at least two embeddings.")
    x = F.normalize(features.float(), dim=1)  # (N, D)
    return exact_others_topk(x, queries.long().to(x.device), min(k, n - 1), chunk)
