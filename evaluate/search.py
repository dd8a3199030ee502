"""``twinview search``: the nearest rows of an embedding file to a few query embeddings.

Exact cosine search, read a batch of rows at a time with a running top-k, so the embeddings never
have to fit in memory: 10 queries against 50,000 rows take well under a second on a CPU
(docs/BENCHMARKS.md). Where ``twinview embed --index ivf|hnsw`` wrote a faiss index beside the file
(:mod:`twinview.evaluate.neighbours`), the index answers instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from twinview.evaluate.embedding_file import iter_embedding_file
from twinview.evaluate.neighbours import index_file, index_search, open_index_file


@dataclass(frozen=True)
class Hits:
    """The k nearest rows of each query, nearest first.

    Attributes:
        rows: ``(Q, k)`` row numbers in the embedding file.
        similarities: ``(Q, k)`` cosine similarities.
        names: ``Q`` lists of ``k`` paths (or row ids).
        engine: ``exact``, or the faiss index beside the file that answered.
    """

    rows: torch.Tensor
    similarities: torch.Tensor
    names: list[list[str]]
    engine: str = "exact"


def running_topk(
    best: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, start: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges a block of scores into the running top-k.

    Args:
        best: ``(Q, k')`` similarities and row numbers found so far (``k' <= k``).
        scores: ``(Q, n)`` similarities of the block's rows.
        start: Row number of the block's first row.
        k: Neighbours to keep.

    Returns:
        The new ``(Q, min(k, k' + n))`` similarities and row numbers, best first.
    """
    rows = torch.arange(start, start + scores.shape[1]).expand_as(scores)
    sims, picks = torch.cat([best[0], scores], dim=1), torch.cat([best[1], rows], dim=1)
    top = sims.topk(min(k, sims.shape[1]), dim=1)
    return top.values, picks.gather(1, top.indices)


def search(queries: torch.Tensor, index: Path, k: int = 10, batch_rows: int = 65536) -> Hits:
    """Exact cosine search of ``queries`` in an embedding file.

    Args:
        queries: ``(Q, D)`` query embeddings (same backbone as the file's).
        index: A file written by ``twinview embed``.
        k: Neighbours per query (fewer when the file has fewer rows).
        batch_rows: Rows read and scored at a time.

    Returns:
        The :class:`Hits`.

    Raises:
        ValueError: If the widths of the queries and the file differ.
    """
    opened = open_index_file(index)
    if opened is not None:  # twinview embed --index: faiss
        faiss_index, made = opened
        if made["dims"] != queries.shape[1]:
            raise ValueError(
                f"'{index}' holds {made['dims']}-dim embeddings, the queries have {queries.shape[1]}: "
                "search with the model that made the file."
            )
        best = index_search(faiss_index, queries, k)
        engine = f"faiss {made['kind'].upper()} index {index_file(index).name} ({made['rows']:,} rows)"
        return _named(best, index, batch_rows, engine)
    q = F.normalize(queries.float(), dim=1)
    best = (torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long))
    for block in iter_embedding_file(index, batch_rows, columns=("embedding",)):
        if block.embeddings.shape[1] != q.shape[1]:
            raise ValueError(
                f"'{index}' holds {block.embeddings.shape[1]}-dim embeddings, the queries have {q.shape[1]}: "
                "search with the model that made the file."
            )
        best = running_topk(best, q @ F.normalize(block.embeddings, dim=1).T, block.start, k)
    return _named(best, index, batch_rows, "exact")


def _named(best: tuple[torch.Tensor, torch.Tensor], index: Path, batch_rows: int, engine: str) -> Hits:
    """The hits with the names of their rows (read from the file)."""
    wanted = set(best[1].flatten().tolist()) - {-1}
    found: dict[int, str] = {}
    for block in iter_embedding_file(index, batch_rows, columns=("path",)):  # only the names of the hits
        found |= {r: n for r, n in enumerate(block.names, start=block.start) if r in wanted}
    names = [[found[r] for r in row if r >= 0] for row in best[1].tolist()]
    return Hits(best[1], best[0], names, engine)
