"""Exact search in an embedding file, read in blocks, against a brute-force sort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from twinview.evaluate.embedding_file import write_embedding_file
from twinview.evaluate.search import search


def write_index(path: Path, x: torch.Tensor, part_rows: int = 17) -> list[str]:
    names = [f"img/{i:04d}.jpg" for i in range(len(x))]
    parts = ((names[i : i + part_rows], x[i : i + part_rows].numpy(), None) for i in range(0, len(x), part_rows))
    write_embedding_file(path, parts, x.shape[1], "float32", {}, len(x))
    return names


def brute_force(queries: torch.Tensor, x: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    out = []
    for q in queries.double():
        sims = [(j, float(q @ r.double() / (q.norm() * r.double().norm()))) for j, r in enumerate(x)]
        out.append(sorted(sims, key=lambda s: -s[1])[:k])
    return out


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_hits_match_brute_force(tmp_path: Path, suffix: str, batch_rows: int) -> None:
    g = torch.Generator().manual_seed(batch_rows)
    x, queries = torch.randn(100, 12, generator=g), torch.randn(5, 12, generator=g)
    names = write_index(tmp_path / f"index{suffix}", x)
    hits = search(queries, tmp_path / f"index{suffix}", k=8, batch_rows=batch_rows)
    for i, expected in enumerate(brute_force(queries, x, 8)):
        assert hits.rows[i].tolist() == [j for j, _ in expected]
        np.testing.assert_allclose(hits.similarities[i].numpy(), [s for _, s in expected], rtol=1e-5, atol=1e-6)
        assert hits.names[i] == [names[j] for j, _ in expected]


def test_an_indexed_image_finds_itself_first_and_k_is_capped(tmp_path: Path) -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    write_index(tmp_path / "index.parquet", x, part_rows=4)
    hits = search(x[[2, 5]] * 3.0, tmp_path / "index.parquet", k=10)  # scale does not matter (cosine)
    assert hits.rows.shape == (2, 6) and hits.rows[:, 0].tolist() == [2, 5]
    torch.testing.assert_close(hits.similarities[:, 0], torch.ones(2))


def test_a_query_of_another_width_is_refused(tmp_path: Path) -> None:
    write_index(tmp_path / "index.parquet", torch.randn(5, 4))
    with pytest.raises(ValueError, match="4-dim"):
        search(torch.randn(1, 3), tmp_path / "index.parquet")
