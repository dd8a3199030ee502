"""Label-free analysis (near-duplicates, clusters, similarity statistics, neighbours) against
brute-force loops, and the plots of the unlabeled report as non-blank PNG files."""

from __future__ import annotations

import csv
import functools
import hashlib
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score

from twinview.evaluate import label_free, plots
from twinview.evaluate.label_free import (
    DuplicatePair,
    auto_num_clusters,
    cluster,
    file_digest,
    find_leaks,
    mark_exact,
    merge_pairs,
    near_duplicates,
    outlier_flags,
    pairwise_cosines,
    relative_duplicates,
    self_neighbours,
    similarity_stats,
    uniqueness,
    write_clusters_csv,
    write_duplicates_csv,
    write_outliers_csv,
)


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def neighbours_loop(x: torch.Tensor, i: int, k: int) -> list[tuple[int, float]]:
    """Brute force: every other item with its similarity to item i, most similar first, the first k."""
    sims = [(j, cosine(x[i], x[j])) for j in range(len(x)) if j != i]
    sims.sort(key=lambda s: -s[1])
    return sims[:k]


def duplicates_loop(x: torch.Tensor, threshold: float, k: int) -> list[tuple[int, int, float]]:
    """Brute force: pairs with similarity >= threshold where one is among the other's k nearest."""
    found = {}
    for i in range(len(x)):
        for j, s in neighbours_loop(x, i, k):
            if s >= threshold:
                found[(min(i, j), max(i, j))] = s
    return sorted(((a, b, s) for (a, b), s in found.items()), key=lambda p: (-p[2], p[0], p[1]))


def planted_copies(seed: int = 0) -> torch.Tensor:
    """40 random 8-d features, 6 of them noisy copies of others (cosine ~0.93 to ~1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 8, generator=g)
    for copy, source, noise in ((5, 1, 0.01), (9, 1, 0.05), (17, 3, 0.2), (22, 30, 0.0), (33, 12, 0.1), (39, 0, 0.3)):
        x[copy] = 2.5 * x[source] + noise * torch.randn(8, generator=g)
    return x


@functools.cache
def planted_duplicates_loop(threshold: float, k: int) -> list[tuple[int, int, float]]:
    """:func:`duplicates_loop` on :func:`planted_copies`, once per case; checks no pair is on the edge."""
    x = planted_copies()
    every = [cosine(x[i], x[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
    assert min(abs(s - threshold) for s in every) > 1e-4  # float32 and float64 agree on every pair
    return duplicates_loop(x, threshold, k)


@pytest.mark.parametrize("chunk", [3, 7, 100])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("threshold", [0.9, 0.99, 0.5])
def test_near_duplicates_match_brute_force(chunk: int, k: int, threshold: float) -> None:
    x = planted_copies()
    slow = planted_duplicates_loop(threshold, k)
    fast = near_duplicates(x, threshold, k=k, chunk=chunk)
    # the same pairs and similarities (copy 22 is exactly 2.5 x item 30, so float rounding alone
    # orders some pairs of equal similarity: the order is checked on the result's own numbers)
    found = {(p.a, p.b): p.similarity for p in fast}
    assert len(found) == len(fast) and all(p.a < p.b for p in fast)
    assert found == pytest.approx({(a, b): s for a, b, s in slow}, abs=1e-5)
    assert fast == sorted(fast, key=lambda p: (-p.similarity, p.a, p.b))
    assert all(not p.exact for p in fast)
    if threshold == 0.9:  # every planted copy is found, whatever k
        assert {(1, 5), (1, 9), (3, 17), (22, 30), (12, 33)} <= {(p.a, p.b) for p in fast}


def test_near_duplicates_threshold_edge_and_tie_order() -> None:
    # Unit rows of +-0.5 entries: every cosine is an exact multiple of 1/4 in float32.
    x = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [3, 3, 3, 3]])
    pairs = near_duplicates(x, 0.5, k=3, chunk=2)
    # (0, 3): 1.0; then three ties at exactly 0.5, ordered by (a, b); (0, 2) and (2, 3) have 0.
    assert [(p.a, p.b, p.similarity) for p in pairs] == [(0, 3, 1.0), (0, 1, 0.5), (1, 2, 0.5), (1, 3, 0.5)]
    assert [(p.a, p.b) for p in near_duplicates(x, 1.0, k=3)] == [(0, 3)]
    assert near_duplicates(x, 0.5000001, k=3) == [DuplicatePair(0, 3, 1.0)]
    assert near_duplicates(x[:1], 0.0) == []


def test_near_duplicates_see_only_k_neighbours_of_a_large_group() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g)
    x[:6] = x[0]  # six identical embeddings: 15 pairs
    partial = near_duplicates(x, 0.999, k=2, chunk=4)
    assert all(p.b < 6 for p in partial) and {p.a for p in partial} | {p.b for p in partial} == set(range(6))
    assert 6 <= len(partial) <= 12  # each of the 6 pairs with 2 others
    full = near_duplicates(x, 0.999, k=5, chunk=4)
    assert [(p.a, p.b) for p in full] == [(a, b) for a in range(6) for b in range(a + 1, 6)]


def test_near_duplicates_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k and chunk"):
        near_duplicates(torch.randn(4, 2), 0.9, k=0)


def test_mark_exact_compares_file_bytes_once_per_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = [b"same bytes " * 50, b"same bytes " * 50, b"same bytes " * 49 + b"other byte "]
    files = []
    for i, data in enumerate(contents):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(data)
    monkeypatch.setattr(label_free, "HASH_BLOCK", 7)  # several blocks per file
    assert file_digest(files[2]) == hashlib.sha256(contents[2]).hexdigest()
    calls: list[int] = []

    def digest(i: int) -> str:
        calls.append(i)
        return file_digest(files[i])

    pairs = [DuplicatePair(0, 1, 0.99), DuplicatePair(0, 2, 0.98), DuplicatePair(1, 2, 0.97)]
    marked = mark_exact(pairs, digest)
    assert [(p.a, p.b, p.similarity, p.exact) for p in marked] == [
        (0, 1, 0.99, True),
        (0, 2, 0.98, False),
        (1, 2, 0.97, False),
    ]
    assert sorted(calls) == [0, 1, 2]
    assert not any(p.exact for p in pairs)  # the input is left as it was


def test_duplicates_csv_round_trip(tmp_path: Path) -> None:
    names = ["a/x.png", "b,c.png", 'quote".png']
    pairs = [DuplicatePair(0, 2, 0.987654, True), DuplicatePair(1, 2, 0.91, False, "hash+relative", 3)]
    out = write_duplicates_csv(pairs, names, tmp_path / "sub" / "dups.csv")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["path_a", "path_b", "similarity", "exact", "rule", "hash_distance"],
        ["a/x.png", 'quote".png', "0.9877", "true", "cosine", ""],
        ["b,c.png", 'quote".png', "0.9100", "false", "hash+relative", "3"],
    ]


def relative_loop(x: torch.Tensor, closeness: float, k: int) -> list[tuple[int, int, float]]:
    """The relative rule as its docstring states it, one image at a time."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    n = len(x)
    sims = x @ x.T
    sims.fill_diagonal_(-2.0)
    order = [sorted(range(n), key=lambda j, i=i: -float(sims[i, j]))[: k + 1] for i in range(n)]
    typical = [float(torch.tensor([float(sims[i, j]) for j in order[i][1:]]).median()) for i in range(n)]
    out = []
    for i in range(n):
        j = order[i][0]
        s = float(sims[i, j])
        near = all(s - t >= 0.01 and (s - t) / (1 - t) >= closeness for t in (typical[i], typical[j]))
        if i < j and order[j][0] == i and near:
            out.append((i, j, s))
    return sorted(out, key=lambda t: -t[2])


def test_relative_duplicates_match_a_loop_and_find_copies_a_threshold_misses() -> None:
    torch.manual_seed(0)
    x = torch.randn(60, 256)  # unrelated images: nearest neighbours at cosine ~0.2
    x[50:55] = x[:5] + 0.6 * torch.randn(5, 256)  # copies at cosine ~0.85, far below a 0.985 threshold
    for closeness, k in ((0.7, 10), (0.3, 3), (0.9, 10)):
        got = [(p.a, p.b, p.similarity) for p in relative_duplicates(x, closeness=closeness, k=k, chunk=7)]
        want = relative_loop(x, closeness, k)
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
        assert [s for *_, s in got] == pytest.approx([s for *_, s in want], abs=1e-5)
    found = {(p.a, p.b) for p in relative_duplicates(x)}
    assert found == {(i, 50 + i) for i in range(5)}  # the copies, and nothing else
    assert near_duplicates(x, 0.985) == []
    assert relative_duplicates(x[:2]) == []


def test_merge_pairs_joins_rules_and_fills_the_cosine_of_hash_pairs() -> None:
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    by_hash = [
        DuplicatePair(0, 1, float("nan"), rule="hash", hash_distance=4),
        DuplicatePair(1, 2, float("nan"), rule="hash", hash_distance=9),
    ]
    by_cosine = [DuplicatePair(0, 1, 0.8)]
    by_relative = [DuplicatePair(0, 1, 0.8, rule="relative")]
    merged = merge_pairs(x, by_relative, by_hash, by_cosine)
    assert merged == [
        DuplicatePair(0, 1, 0.8, rule="hash+cosine+relative", hash_distance=4),
        DuplicatePair(1, 2, pytest.approx(0.6), rule="hash", hash_distance=9),
    ]


def blobs(sizes: tuple[int, ...], dims: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs around orthogonal directions, shuffled; returns features and true blob."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    truth = truth[torch.randperm(len(truth), generator=g)]
    centres = 3.0 * torch.eye(dims)[: len(sizes)]
    return centres[truth] + 0.1 * torch.randn(len(truth), dims, generator=g), truth


def central_loop(x: torch.Tensor, labels: torch.Tensor, c: int, m: int) -> list[int]:
    """Brute force: members of cluster c sorted by cosine to the mean of the normalised members."""
    members = [i for i in range(len(x)) if labels[i] == c]
    unit = [x[i].double() / x[i].double().norm() for i in members]
    centre = sum(unit) / len(unit)
    return sorted(members, key=lambda i: -cosine(x[i], centre))[:m]


@pytest.mark.parametrize("minibatch", [False, True])
def test_clusters_recover_planted_blobs(minibatch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if minibatch:
        monkeypatch.setattr(label_free, "FULL_KMEANS_MAX", 10)
    x, truth = blobs((12, 30, 8, 20))
    result = cluster(x, num_clusters=4, seed=0, central=5)
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) == 1.0
    assert result.labels.dtype == torch.int64 and result.labels.shape == (70,)
    assert result.sizes == [30, 20, 12, 8]
    for c, blob in enumerate((1, 3, 0, 2)):  # cluster 0 is the largest blob (30), ...
        assert bool((result.labels[truth == blob] == c).all())
        assert result.central[c] == central_loop(x, result.labels, c, 5)


def test_cluster_counts_and_central_cap() -> None:
    x, _ = blobs((5, 3))
    result = cluster(x, num_clusters=2, central=4)
    assert result.sizes == [5, 3] and [len(c) for c in result.central] == [4, 3]  # 4 of the 5 in the first
    assert all(bool((result.labels[c] == i).all()) for i, c in enumerate(result.central))
    auto = cluster(blobs((40, 30, 30))[0])
    assert len(auto.sizes) == auto_num_clusters(100) == 7 and sum(auto.sizes) == 100
    assert auto.sizes == sorted(auto.sizes, reverse=True)
    assert [auto_num_clusters(n) for n in (1, 2, 3, 8, 9, 200, 10**6)] == [1, 2, 2, 2, 2, 10, 50]


def test_cluster_drops_clusters_left_empty() -> None:
    x = torch.eye(3).repeat(4, 1)  # 12 embeddings, 3 distinct
    with pytest.warns(ConvergenceWarning):
        result = cluster(x, num_clusters=5)
    assert result.sizes == [4, 4, 4]
    assert set(result.labels.tolist()) == {0, 1, 2}
    assert result.central[0] == [0, 3, 6, 9]  # all at cosine 1 from their centre: by index
    with pytest.raises(ValueError, match="num_clusters"):
        cluster(x, num_clusters=13)


def test_clusters_csv_round_trip(tmp_path: Path) -> None:
    x, _ = blobs((6, 4))
    result = cluster(x, num_clusters=2)
    names = [f"img/{i:02d}.png" for i in range(10)]
    out = write_clusters_csv(result, names, tmp_path / "clusters.csv")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "cluster"]
    assert rows[1:] == [[n, str(c)] for n, c in zip(names, result.labels.tolist(), strict=True)]


def summary_numpy(values: list[float]) -> dict[str, float]:
    v = np.array(values, dtype=np.float64)
    return {"mean": v.mean(), "p5": np.percentile(v, 5), "p50": np.percentile(v, 50), "p95": np.percentile(v, 95)}


@pytest.mark.parametrize("n,sample", [(30, 2000), (50, 20)])
def test_similarity_stats_match_numpy(n: int, sample: int) -> None:
    g = torch.Generator().manual_seed(n)
    features = torch.randn(n, 5, generator=g) * torch.rand(n, 1, generator=g) * 3 + 0.3
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:sample]
    x = features[pick].double().numpy()
    units = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [float(units[i] @ units[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
    nearest = [max(float(units[i] @ units[j]) for j in range(len(x)) if j != i) for i in range(len(x))]
    expected = {
        "norm": summary_numpy([float(np.linalg.norm(row)) for row in x]),
        "cosine": summary_numpy(pairs),
        "nn_cosine": summary_numpy(nearest),
    }
    stats = asdict(similarity_stats(features, sample=sample, seed=7))
    assert stats.keys() == expected.keys()
    for name, values in expected.items():
        assert stats[name] == pytest.approx(values, rel=1e-5, abs=1e-6), name
    cosines = pairwise_cosines(features, sample=sample, seed=7)
    assert len(cosines) == len(x) * (len(x) - 1) // 2
    assert sorted(cosines.tolist()) == pytest.approx(sorted(pairs), abs=1e-6)


def test_similarity_stats_reject_a_sample_too_large_for_quantiles() -> None:
    with pytest.raises(ValueError, match="sample"):
        similarity_stats(torch.randn(10, 3), sample=10_000)
    with pytest.raises(ValueError, match="two"):
        pairwise_cosines(torch.randn(1, 3))


@pytest.mark.parametrize("k,chunk", [(1, 2), (4, 3), (100, 50)])
def test_self_neighbours_match_brute_force(k: int, chunk: int) -> None:
    x = planted_copies(seed=k)[:20]
    queries = torch.tensor([0, 5, 19, 1, 5])
    idx, sims = self_neighbours(x, queries, k=k, chunk=chunk)
    assert idx.shape == sims.shape == (5, min(k, 19)) and idx.dtype == torch.long
    for row, q in enumerate(queries.tolist()):
        slow = neighbours_loop(x, q, k)
        assert idx[row].tolist() == [j for j, _ in slow]
        assert sims[row].tolist() == pytest.approx([s for _, s in slow], abs=1e-5)
        assert q not in idx[row].tolist()


def test_self_neighbours_exclude_an_identical_copy_only_by_index() -> None:
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    idx, sims = self_neighbours(x, torch.tensor([0, 1]), k=1)
    assert idx.tolist() == [[1], [0]] and sims.tolist() == [[1.0], [1.0]]


def images(count: int, seed: int = 0, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8))


def assert_drawn(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.std() > 0, path


def test_self_neighbour_grid_draws(tmp_path: Path) -> None:
    queries = torch.stack(images(3))
    neighbours = [images(4, seed=s) for s in (1, 2, 3)]
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6]] * 3)
    out = plots.self_neighbour_grid(queries, neighbours, sims, tmp_path / "nn.png", "nearest neighbours")
    assert out == tmp_path / "nn.png"
    assert_drawn(out)


@pytest.mark.parametrize("count", [0, 4, 30])
def test_pair_grid_draws(count: int, tmp_path: Path) -> None:
    tiles = images(2 * count)
    pairs = list(zip(tiles[::2], tiles[1::2], strict=True))
    out = plots.pair_grid(
        pairs, [0.9 + i / 1000 for i in range(count)], [i % 5 == 0 for i in range(count)], tmp_path / "p.png", "dups"
    )
    assert_drawn(out)
    width, height = Image.open(out).size
    if count == 30:  # 3 pairs per row: 10 rows of 6 tiles
        assert height > width


def test_cluster_grid_draws_and_caps_rows(tmp_path: Path) -> None:
    rows = [images(1 + c % 4, seed=c) for c in range(14)]
    out = plots.cluster_grid(rows, [50 - c for c in range(14)], tmp_path / "c.png")
    assert_drawn(out)
    assert Image.open(out).size[1] < 1.6 * 110 * (plots.CLUSTER_ROWS + 1)  # 12 rows, not 14


def test_similarity_histogram_draws(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pretrained = pairwise_cosines(torch.randn(60, 8, generator=g))
    random_init = pairwise_cosines(torch.randn(60, 8, generator=g) + 2.0)
    out = plots.similarity_histogram({"pretrained": pretrained, "random init": random_init}, tmp_path / "h.png")
    assert_drawn(out)
    assert math.isclose(Image.open(out).size[0], 6.5 * 110, abs_tol=2)


def test_uniqueness_is_one_minus_the_kth_neighbour_cosine_of_a_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    for k in (1, 3, 29, 50):  # 50: capped at N - 1
        want = []
        for i in range(len(x)):
            others = sorted((float(xn[i] @ xn[j]) for j in range(len(x)) if j != i), reverse=True)
            want.append(1 - others[min(k, len(x) - 1) - 1])
        assert uniqueness(x, k=k, chunk=4).tolist() == pytest.approx(want, abs=1e-5)


def test_an_image_unlike_the_others_ranks_first_and_flags_are_written(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = torch.randn(1, 32)
    x = base + 0.3 * torch.randn(20, 32)  # one tight group
    x[7] = torch.randn(32)  # and one image like none of them
    scores = uniqueness(x, k=3)
    assert int(scores.argmax()) == 7
    flags = [outlier_flags(40.0, (96, 96), 96.0)] * 20
    flags[3] = outlier_flags(1.0, (96, 96), 96.0)
    flags[4] = outlier_flags(40.0, (12, 200), 96.0)  # 12 < 96 / 4
    flags[5] = outlier_flags(0.0, (8, 8), 96.0)
    assert flags[3:6] == ["near-constant", "tiny", "near-constant+tiny"]
    assert outlier_flags(40.0, None, 96.0) == outlier_flags(40.0, (24, 24), 96.0) == ""  # 24 = 96 / 4: not tiny
    names = [f"img{i}.png" for i in range(20)]
    path, order = write_outliers_csv(scores, flags, names, tmp_path / "o" / "outliers.csv", k=3)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "uniqueness_k3", "flags"] and rows[1][0] == "img7.png"
    assert [r[0] for r in rows[1:]] == [names[i] for i in order] and len(rows) == 21
    assert [float(r[1]) for r in rows[1:]] == sorted((float(r[1]) for r in rows[1:]), reverse=True)
    assert {r[0]: r[2] for r in rows[1:]}["img5.png"] == "near-constant+tiny"


def test_find_leaks_matches_a_loop_over_both_rules() -> None:
    torch.manual_seed(0)
    train = torch.randn(40, 64)
    test = torch.randn(15, 64)
    test[3] = train[7] + 0.01 * torch.randn(64)  # an embedding copy
    rng = np.random.default_rng(0)
    train_h = rng.integers(0, 2**63, (40, 2), dtype=np.int64).astype(np.uint64)
    test_h = rng.integers(0, 2**63, (15, 2), dtype=np.int64).astype(np.uint64)
    test_h[9, 0] = train_h[21, 1] ^ np.uint64(0b101)  # 2 bits from a training image's mirror hash
    test_h[3] = train_h[7]  # the embedding copy is a hash copy as well
    train_t = rng.integers(0, 256, (40, 8, 8), dtype=np.int64).astype(np.uint8)
    test_t = rng.integers(0, 256, (15, 8, 8), dtype=np.int64).astype(np.uint8)
    test_t[3] = train_t[7]  # thumbnails of a copy agree; test 9's do not (yet)
    threshold, max_distance, closeness, k = 0.9, 4, 0.7, 10
    a, b = F.normalize(train, dim=1), F.normalize(test, dim=1)

    def bits(x: int) -> int:
        return bin(x).count("1")

    want = []
    for i in range(15):
        sims = [float(b[i] @ a[j]) for j in range(40)]
        ranked = sorted(range(40), key=lambda j: -sims[j])
        j_cos = ranked[0]
        typical = float(torch.tensor([sims[j] for j in ranked[1 : k + 1]]).median())
        by_cosine = (
            sims[j_cos] >= threshold
            and sims[j_cos] - typical >= 0.01
            and (sims[j_cos] - typical) / (1 - typical) >= closeness
        )
        dists = [
            min(bits(int(test_h[i, 0]) ^ int(train_h[j, 0])), bits(int(test_h[i, 0]) ^ int(train_h[j, 1])))
            for j in range(40)
        ]
        j_hash = min(range(40), key=lambda j: dists[j])
        thumb = min(
            np.abs(test_t[i].astype(float) - train_t[j_hash]).mean(),
            np.abs(test_t[i].astype(float) - train_t[j_hash][:, ::-1]).mean(),
        )
        if dists[j_hash] <= max_distance and thumb <= 8.0:
            want.append((i, j_hash, "hash+cosine" if by_cosine and j_hash == j_cos else "hash", dists[j_hash]))
        elif by_cosine:
            want.append((i, j_cos, "cosine", dists[j_cos]))
    thumbs = (train_t, test_t)
    got = find_leaks(train, test, threshold, (train_h, test_h), max_distance, thumbs, closeness, k, chunk=4)
    assert [(x.test, x.train, x.rule, x.hash_distance) for x in got] == want
    # test 9's hash is 2 bits from training image 21's mirror, but their thumbnails differ: a look-alike
    assert [(x.test, x.train, x.rule) for x in got] == [(3, 7, "hash+cosine")]
    test_t[9] = train_t[21][:, ::-1]  # now its thumbnail is that image's mirror: a copy
    assert [(x.test, x.train, x.rule) for x in find_leaks(train, test, threshold, (train_h, test_h), 4, thumbs)] == [
        (3, 7, "hash+cosine"),
        (9, 21, "hash"),
    ]
    unconfirmed = find_leaks(train, test, threshold, (train_h, test_h), 4)  # without thumbnails: the hash alone
    assert [(x.test, x.rule) for x in unconfirmed] == [(3, "hash+cosine"), (9, "hash")]
    assert [(x.test, x.rule) for x in find_leaks(train, test, threshold)] == [(3, "cosine")]  # no hashes
