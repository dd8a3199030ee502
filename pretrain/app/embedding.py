"""``twinview embed`` and ``twinview search``: every image of a source embedded into a file with a
trained model, and the nearest images of such a file to new ones.

The model's :class:`~twinview.evaluate.features.Embedder` (its image size, normalisation, batch size
and workers from the run's config) does the embedding in :mod:`twinview.evaluate.embed`, exactly as
``twinview evaluate`` extracts features; :mod:`twinview.evaluate.search` does the search.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from twinview.evaluate.dataset import LabelledImages
from twinview.evaluate.embed import EmbedSummary
from twinview.evaluate.features import Embedder
from twinview.evaluate.search import Hits
from twinview.pretrain.app.model import TrainedModel, launched_accelerator, load_model, main_print
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.source import IMAGE_EXTENSIONS, Source, resolve_source

MAX_QUERIES = 1000  # search is for a few new images; embed a larger set with twinview embed


def absolute_source(source: str) -> str:
    """A local folder or file list as an absolute path (so the names written with the embeddings
    resolve from any working directory); other sources (``hf:...``, shard patterns) as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def embed_images(
    model: TrainedModel,
    embedder: Embedder,
    source: Source,
    dataset: LabelledImages,
    out: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    mirrored: bool = False,
    desc: str = "embed",
) -> EmbedSummary:
    """:func:`twinview.evaluate.embed.embed_source` of every image of a source, with the file's
    metadata saying what made it (model, weights, image size, source).

    Args:
        model: The trained model (its config and folder, for the metadata).
        embedder: Its backbone (or a random-init copy) and extraction settings.
        source: The resolved source.
        dataset: ``source`` opened strict at ``data.image_size`` (a bad image is listed in
            ``OUT.skipped.txt``, not replaced).
        out: ``.parquet`` or ``.npy`` file.
        dtype: ``float32`` or ``float16`` in the file.
        overwrite: Replace an existing file.
        progress: Show a progress bar.
        mirrored: Embed the mirror images instead (see :func:`~twinview.evaluate.embed.embed_source`).
        desc: The progress bar's label.
    """
    from twinview.evaluate.embed import embed_source
    from twinview.pretrain import __version__
    from twinview.pretrain.data.decode import BadImage

    metadata = {
        "model": model.cfg.model.backbone,
        "made_from": str(model.path),
        "image_size": dataset.image_size,
        "weights": embedder.weights(),
        "source": absolute_source(source.path),
        "twinview": __version__,
    }
    return embed_source(
        embedder,
        dataset,
        out,
        metadata=metadata,
        dtype=dtype,
        skip_errors=(BadImage,),
        overwrite=overwrite,
        progress=progress,
        mirrored=mirrored,
        desc=desc,
    )


def run_embed(args: argparse.Namespace) -> int:
    """``twinview embed MODEL --data SOURCE --out FILE ...``"""
    from twinview.evaluate.embed import skipped_file
    from twinview.evaluate.neighbours import faiss_available, write_index_file

    if args.index and not faiss_available():
        raise ValueError(f"--index {args.index} needs faiss: pip install twinview[scale] (or faiss-cpu).")
    model = load_model(Path(args.run_dir), args.overrides)
    accelerator = launched_accelerator()
    source = resolve_source(absolute_source(args.data), split=args.split, survey=False)
    main_print(f"Embedding {args.data} at {model.cfg.data.size} px with {model.cfg.model.backbone} from {args.run_dir}")
    dataset = open_images(source, model.cfg.data.size, strict=True)
    summary = embed_images(
        model, model.embedder(accelerator), source, dataset, Path(args.out), dtype=args.dtype, overwrite=args.overwrite
    )
    resumed = f", {summary.chunks_done_before} chunk(s) from an earlier try" if summary.chunks_done_before else ""
    main_print(
        f"Wrote {summary.rows:,} embeddings of {summary.dims} dims ({args.dtype}) to {summary.out} "
        f"in {summary.seconds:.0f} s{resumed}."
    )
    if summary.skipped:
        main_print(f"Skipped {len(summary.skipped)} image(s) that could not be decoded: {skipped_file(summary.out)}")
    if args.index and (accelerator is None or accelerator.is_main_process):
        started = time.perf_counter()
        written = write_index_file(Path(args.out), args.index, seed=model.cfg.train.seed)
        print(f"Wrote a faiss {args.index.upper()} index to {written} in {time.perf_counter() - started:.0f} s.")
    return 0


@dataclass(frozen=True)
class SearchResult:
    """What ``twinview search`` found.

    Attributes:
        queries: The query images' names (those that could be decoded).
        images: ``(Q, 3, S, S)`` uint8 query images.
        hits: Their nearest rows of the index.
        warnings: Query images skipped, with the reason.
    """

    queries: list[str]
    images: torch.Tensor
    hits: Hits
    warnings: list[str]


def search_images(model: TrainedModel, index: Path, query: str, k: int) -> SearchResult:
    """Embeds the query image(s) as ``twinview embed`` did the index, and searches the index.

    Args:
        model: The model that made the index.
        index: An embedding file written by ``twinview embed``.
        query: An image file, or a folder / file list of at most ``MAX_QUERIES`` images.
        k: Neighbours per query.

    Raises:
        FileNotFoundError: A missing index or query.
        ValueError: An index made by other weights, or too many queries.
        BadImage: No query image could be decoded.
    """
    from twinview.evaluate.embedding_file import read_metadata
    from twinview.evaluate.search import search
    from twinview.pretrain.data.decode import BadImage
    from twinview.pretrain.data.folder import load_image

    if not Path(index).is_file():
        raise FileNotFoundError(f"--index '{index}' does not exist (write one with twinview embed).")
    embedder = model.embedder()
    made_by = read_metadata(index)
    size = int(made_by.get("image_size", model.cfg.data.size))
    if made_by.get("weights") not in (None, embedder.weights()):
        raise ValueError(
            f"--index '{index}' was made by other weights ({made_by.get('made_from')}): search it with that "
            "model, or embed the images again with this one."
        )
    path = Path(query)
    if not path.exists() and not query.startswith("hf:"):
        raise FileNotFoundError(f"--query '{query}' does not exist.")
    warnings = []
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            names, images = [str(path)], load_image(path, size)[None]
        except BadImage as err:
            raise BadImage(f"--query '{path}': {err}") from None
    else:
        dataset = open_images(resolve_source(absolute_source(query), survey=False), size, strict=True)
        if len(dataset) > MAX_QUERIES:
            raise ValueError(
                f"--query '{query}' holds {len(dataset):,} images (at most {MAX_QUERIES}); "
                "embed it with twinview embed instead."
            )
        names, decoded = [], []
        for i, file in enumerate(dataset.index.files):
            try:
                decoded.append(dataset[i][0])
                names.append(str(file))
            except BadImage as err:  # listed, not replaced by its neighbour
                warnings.append(f"skipped {file}: {getattr(err, 'reason', err)}")
        if not decoded:
            raise BadImage(f"--query '{query}': none of its {len(dataset)} images could be decoded.")
        images = torch.stack(decoded)
    features = torch.cat([embedder.forward(batch).cpu() for batch in images.split(embedder.batch_size)])
    return SearchResult(names, images, search(features, index, k), warnings)


def run_search(args: argparse.Namespace) -> int:
    """``twinview search MODEL --index FILE --query IMAGE_OR_FOLDER [--k K] [--out PNG]``"""
    from twinview.evaluate.plots import self_neighbour_grid
    from twinview.pretrain.data.folder import load_image

    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}.")
    model = load_model(Path(args.run_dir), args.overrides)
    found = search_images(model, Path(args.index), args.query, args.k)
    for warning in found.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"search: {found.hits.engine}", file=sys.stderr)
    for name, row, sims in zip(found.queries, found.hits.names, found.hits.similarities.tolist(), strict=True):
        print(name)
        for rank, (other, sim) in enumerate(zip(row, sims, strict=True), start=1):
            print(f"  {rank:>3}  {sim:.4f}  {other}")
    size = found.images.shape[-1]

    def tile(name: str) -> torch.Tensor:
        file = Path(name)
        return load_image(file, size) if file.is_file() else torch.full((3, size, size), 128, dtype=torch.uint8)

    self_neighbour_grid(
        list(found.images),
        [[tile(n) for n in row] for row in found.hits.names],
        found.hits.similarities,
        Path(args.out),
        f"nearest in {args.index}",
    )
    print(f"Wrote {args.out}")
    return 0
