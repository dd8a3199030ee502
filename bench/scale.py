"""Neighbour search at a million images: faiss's inverted file against the exact search.

``--rows`` synthetic 512-d embeddings shaped like a backbone's (clustered, of low intrinsic
dimension, with noise), of which ``--planted`` are near-copies (cosine > 0.99) of other rows. On
this host, with twinview's own functions (:mod:`twinview.evaluate.neighbours` picks faiss from
100,000 rows on a CPU):

- the neighbour graph (each row's 10 nearest others) and from it the near-duplicates at cosine 0.985
  and the relative duplicates, as ``twinview evaluate --data`` computes them: time, planted pairs
  found, peak memory;
- recall@10 of the graph against the exact search, on ``--recall-rows`` random rows (their exact
  neighbours among all rows, in blocks);
- k-means of all rows (faiss, 50 clusters) and ``twinview search`` of 10 queries with an IVF index
  beside an embedding file, against exact search of the file.

Targets (checked in the output): recall@10 >= 0.95, planted pairs found >= 0.95, the near-duplicate
search of a million rows <= 10 min. Prints one JSON object with the host kind.

Usage: python bench/scale.py [--rows 1000000] [--planted 10000] [--recall-rows 1000] [--skip-search]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from host import host_kind

from twinview.evaluate import label_free, neighbours
from twinview.evaluate.embedding_file import write_embedding_file
from twinview.evaluate.search import search


def synthetic(rows: int, planted: int, dims: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``rows`` embeddings, the last ``planted`` of them near-copies of random earlier rows."""
    g = torch.Generator().manual_seed(seed)
    base = rows - planted
    centres = torch.randn(1000, 32, generator=g) * 2
    mixing = torch.randn(32, dims, generator=g)
    x = torch.empty(rows, dims)
    for start in range(0, base, 100_000):  # in blocks: the intermediate latent stays small
        n = min(100_000, base - start)
        latent = centres[torch.randint(0, 1000, (n,), generator=g)] + torch.randn(n, 32, generator=g)
        x[start : start + n] = latent @ mixing + 0.5 * torch.randn(n, dims, generator=g)
    originals = torch.randperm(base, generator=g)[:planted]
    noise = torch.randn(planted, dims, generator=g)
    x[base:] = F.normalize(x[originals], dim=1) + 0.08 * F.normalize(noise, dim=1)  # cosine ~0.997
    return x, [(int(o), base + i) for i, o in enumerate(originals)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--planted", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--recall-rows", type=int, default=1000)
    parser.add_argument("--skip-search", action="store_true", help="leave out the embedding file and search")
    args = parser.parse_args()
    out: dict[str, object] = {"benchmark": "scale", "host": host_kind(), "rows": args.rows, "dims": args.dims}
    out["engine"] = neighbours.engine_note(args.rows)
    started = time.perf_counter()
    x, pairs = synthetic(args.rows, args.planted, args.dims, 0)
    out["make_data_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    graph = neighbours.neighbour_graph(x, label_free.RELATIVE_K + 1)
    graph_s = time.perf_counter() - started
    started = time.perf_counter()
    cosine = {(p.a, p.b) for p in label_free.near_duplicates(x, 0.985, graph=graph)}
    relative = {(p.a, p.b) for p in label_free.relative_duplicates(x, graph=graph)}
    pairs_s = time.perf_counter() - started
    planted = {(min(a, b), max(a, b)) for a, b in pairs}
    found = planted & (cosine | relative)
    out["near_duplicates"] = {
        "graph_engine": graph.engine,
        "graph_s": round(graph_s, 1),
        "pairs_s": round(pairs_s, 1),
        "total_s": round(graph_s + pairs_s, 1),
        "planted": len(planted),
        "planted_found": len(found),
        "found_by_cosine": len(planted & cosine),
        "found_by_relative": len(planted & relative),
        "other_pairs_cosine": len(cosine - planted),
        "other_pairs_relative": len(relative - planted),
        "peak_mb": round(peak_mb()),
    }

    rng = np.random.default_rng(1)
    rows = torch.from_numpy(np.sort(rng.choice(args.rows, args.recall_rows, replace=False)))
    started = time.perf_counter()
    exact, _ = label_free.exact_others_topk(F.normalize(x, dim=1), rows, 10, chunk=256)
    exact_s = time.perf_counter() - started
    approx = graph.indices[rows, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist(), strict=True)])
    out["recall_at_10"] = round(float(recall), 4)
    out["exact_s_per_1000_rows"] = round(exact_s / args.recall_rows * 1000, 1)
    out["exact_all_pairs_estimate_h"] = round(exact_s / args.recall_rows * args.rows / 3600, 2)
    del graph

    started = time.perf_counter()
    clusters = label_free.cluster(x, 50, seed=0)
    out["kmeans_50_s"] = round(time.perf_counter() - started, 1)
    out["kmeans_sizes_min_max"] = [min(clusters.sizes), max(clusters.sizes)]

    if not args.skip_search:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "e.parquet"
            names = [f"img_{i:07d}.jpg" for i in range(args.rows)]
            parts = ((names[s : s + 65536], x[s : s + 65536].numpy(), None) for s in range(0, args.rows, 65536))
            write_embedding_file(file, parts, args.dims, "float32", {}, args.rows)
            queries = x[torch.from_numpy(rng.choice(args.rows, 10, replace=False))]
            started = time.perf_counter()
            by_exact = search(queries, file, 10)
            exact_search_s = time.perf_counter() - started
            started = time.perf_counter()
            neighbours.write_index_file(file, "ivf")
            build_s = time.perf_counter() - started
            started = time.perf_counter()
            by_index = search(queries, file, 10)
            index_search_s = time.perf_counter() - started
            agree = np.mean(
                [len(set(a) & set(b)) / 10 for a, b in zip(by_index.rows.tolist(), by_exact.rows.tolist(), strict=True)]
            )
            out["search_10_queries"] = {
                "exact_s": round(exact_search_s, 1),
                "ivf_build_s": round(build_s, 1),
                "ivf_s_with_load": round(index_search_s, 1),
                "recall_at_10": round(float(agree), 3),
                "engine": by_index.engine,
            }
    out["peak_mb"] = round(peak_mb())
    nd = out["near_duplicates"]
    assert isinstance(nd, dict)
    out["targets"] = {
        "recall@10 >= 0.95": {"value": out["recall_at_10"], "met": bool(recall >= 0.95)},
        "planted pairs found >= 0.95": {
            "value": round(nd["planted_found"] / max(1, nd["planted"]), 4),
            "met": bool(nd["planted_found"] >= 0.95 * nd["planted"]),
        },
        "near-duplicate search <= 600 s": {"value": nd["total_s"], "met": bool(nd["total_s"] <= 600)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
