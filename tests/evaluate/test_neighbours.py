"""The neighbour graph: exact against brute force, faiss against exact (recall), and every user of
the graph (near-duplicates, relative duplicates, uniqueness, leaks, k-means) on the faiss path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinview.evaluate import label_free, neighbours
from twinview.evaluate.neighbours import cross_topk, engine_note, neighbour_graph

needs_faiss = pytest.mark.skipif(
    not neighbours.faiss_available(), reason="faiss-cpu is not installed (twinview[scale])"
)


def _photos_like(n: int, dims: int = 64, seed: int = 0, copies: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Clustered embeddings of low intrinsic dimension (as a backbone's are), plus ``copies`` planted
    near-copies (cosine > 0.99) of random rows, appended at the end."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, 16, generator=g) * 2
    latent = centres[torch.randint(0, 50, (n,), generator=g)] + torch.randn(n, 16, generator=g)
    x = latent @ torch.randn(16, dims, generator=g) + 0.3 * torch.randn(n, dims, generator=g)
    originals = torch.randperm(n, generator=g)[:copies]
    planted = F.normalize(x[originals], dim=1) + 0.02 * torch.randn(copies, dims, generator=g) / dims**0.5
    pairs = [(int(o), n + i) for i, o in enumerate(originals)]
    return torch.cat([x, planted]), pairs


@pytest.fixture
def faiss_from_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss for sets of 500 rows and more (the default threshold is 100,000)."""
    monkeypatch.setattr(neighbours, "FAISS_MIN_ROWS", 500)


def test_the_exact_graph_is_brute_force() -> None:
    x, _ = _photos_like(300)
    graph = neighbour_graph(x, 5, chunk=64)
    cosine = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    cosine.fill_diagonal_(-2)
    assert graph.engine == "exact"
    assert torch.equal(graph.indices, cosine.topk(5, dim=1).indices)


@needs_faiss
def test_faiss_graph_finds_the_exact_neighbours(faiss_from_500: None) -> None:
    x, _ = _photos_like(4000)
    approx = neighbour_graph(x, 10)
    exact = label_free.exact_others_topk(F.normalize(x, dim=1), torch.arange(4000), 10)[0]

    assert approx.engine == "faiss-ivf" and approx.indices.shape == (4000, 10)
    assert not (approx.indices == torch.arange(4000)[:, None]).any()  # never itself
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.indices.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.95, recall
    assert (approx.similarities[:, :-1] >= approx.similarities[:, 1:]).all()  # most similar first


@needs_faiss
def test_an_exact_copy_is_a_neighbour_and_not_itself(faiss_from_500: None) -> None:
    x, _ = _photos_like(1000)
    x = torch.cat([x, x[:5]])  # rows 1000-1004 are byte-equal copies of rows 0-4
    graph = neighbour_graph(x, 3)
    for i in range(5):
        assert graph.indices[i, 0] == 1000 + i and graph.indices[1000 + i, 0] == i
        assert graph.similarities[i, 0] == pytest.approx(1.0, abs=1e-5)


@needs_faiss
def test_planted_copies_are_found_on_the_faiss_path(faiss_from_500: None) -> None:
    x, pairs = _photos_like(3000, copies=60)
    found = {(p.a, p.b) for p in label_free.near_duplicates(x, 0.99)}
    assert sum(p in found for p in pairs) >= 0.95 * len(pairs)
    relative = {(p.a, p.b) for p in label_free.relative_duplicates(x)}
    assert sum(p in relative for p in pairs) >= 0.95 * len(pairs)
    with_faiss = label_free.uniqueness(x)
    exact = label_free.uniqueness(
        x,
        graph=neighbours.NeighbourGraph(
            *label_free.exact_others_topk(F.normalize(x, dim=1), torch.arange(len(x)), 10), "exact"
        ),
    )
    assert (with_faiss - exact).abs().max() < 0.05  # the 10th neighbour's distance, nearly the same


@needs_faiss
def test_leaks_on_the_faiss_path(faiss_from_500: None) -> None:
    train, _ = _photos_like(2000, seed=1)
    test, _ = _photos_like(200, seed=2)
    test[:10] = train[100:110] * 1.01  # ten leaked test images
    leaks = label_free.find_leaks(train, test, 0.99)
    assert [(x.test, x.train) for x in leaks] == [(i, 100 + i) for i in range(10)]
    idx, sims = cross_topk(test, train, 3)
    assert idx.shape == (200, 3) and (sims[:, 0] >= sims[:, 1]).all()


@needs_faiss
def test_kmeans_on_the_faiss_path_is_seeded_and_separates_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neighbours, "FAISS_MIN_ROWS", 500)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 5
    x = torch.cat([c + torch.randn(300, 32, generator=g) for c in centres])
    a, b = label_free.cluster(x, 4, seed=3), label_free.cluster(x, 4, seed=3)
    assert torch.equal(a.labels, b.labels) and a.sizes == [300] * 4
    assert all(len(set(a.labels[i * 300 : (i + 1) * 300].tolist())) == 1 for i in range(4))


@needs_faiss
def test_the_engine_is_named_with_its_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_note(1000).startswith("exact (under 100,000 rows")
    assert engine_note(200_000).startswith("faiss IVF (200,000 rows >= 100,000")
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    assert "pip install twinview[scale]" in engine_note(200_000)


@needs_faiss
def test_a_query_whose_cells_hold_too_few_rows_is_searched_in_every_cell() -> None:
    x, _ = _photos_like(2000)
    x = F.normalize(x, dim=1).numpy()
    index = neighbours.ivf_index(x, nprobe=1)  # one of 50 cells per query: ~40 rows, often fewer than 60
    _, raw_ids = index.search(x[:40], 60)
    short = (raw_ids < 0).any(axis=1)  # what faiss alone answers: -1 for the missing rows
    assert 0 < short.sum() < 40
    sims, ids = neighbours._search(index, x[:40], 60)
    assert (ids >= 0).all() and np.isfinite(sims).all()
    assert (ids[~short] == raw_ids[~short]).all()  # the others as faiss answered them
    exact = torch.from_numpy(x[:40] @ x.T).topk(60, dim=1).indices.numpy()
    overlap = [len(set(a) & set(e)) for a, e in zip(ids[short], exact[short], strict=True)]
    assert min(overlap) >= 59, overlap  # every cell visited: exact, but for a tie at the 60th place
    assert index.nprobe == 1  # restored


@needs_faiss
def test_a_row_with_more_identical_copies_than_k_never_lists_itself(faiss_from_500: None) -> None:
    x, _ = _photos_like(1000)
    x = torch.cat([x, x[:1].repeat(20, 1)])  # row 0 and 20 copies: 21 rows at cosine 1
    graph = neighbour_graph(x, 3)
    for row in [0, *range(1000, 1020)]:
        assert row not in graph.indices[row].tolist()
        assert set(graph.indices[row].tolist()) <= {0, *range(1000, 1020)}
        assert graph.similarities[row].min() > 0.9999
