"""A run's backbone scored by :mod:`twinview.evaluate.run`, with what the run's Config says.

``twinview evaluate``, ``twinview demo`` and the online monitor load their labelled folders and
take the image size, kNN settings, augment recipe and seed from the run's config here;
``twinview.evaluate`` itself knows nothing of a pretraining run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twinview.evaluate.dataset import LabelledImages, check_labelled_pair
from twinview.evaluate.run import default_device, evaluate
from twinview.pretrain.config import Config
from twinview.pretrain.data.images import open_images
from twinview.pretrain.data.sources import FolderIndex
from twinview.pretrain.models import create_backbone, normalization_stats

if TYPE_CHECKING:
    from twinview.evaluate.embed import EmbedSummary
    from twinview.evaluate.search import Hits


def labelled_folders(
    train_path: str, test_path: str, image_size: int, names: tuple[str, str] = ("--train", "--test")
) -> tuple[LabelledImages, LabelledImages]:
    """The reference and query data sets of two labelled sources.

    Args:
        train_path: Labelled reference: a folder of class sub-folders, a labelled file list, a
            Hugging Face source with a label column or tar shards with ``.cls`` fields.
        test_path: Labelled query source with the same class names.
        image_size: Side the images are loaded at.
        names: How the two are called in error messages.

    Raises:
        ValueError: If a folder is unlabeled or the class names differ.
    """
    reference, query = open_images(train_path, image_size), open_images(test_path, image_size)
    check_labelled_pair(reference, query, names)
    return reference, query


class LabelledSubset:
    """Some items of a labelled data set, as a data set of their own (what evaluation reads)."""

    def __init__(self, dataset: LabelledImages, items: list[int], name: str) -> None:
        """Selects ``items`` of ``dataset``; ``name`` tells the part apart (messages, feature cache)."""
        self.dataset, self.items, self.name = dataset, items, name
        index = dataset.index
        self.index = FolderIndex(
            root=Path(f"{index.root}#{name}"),
            files=tuple(index.files[i] for i in items),
            labels=tuple(index.labels[i] for i in items),
            classes=tuple(index.classes),
        )
        self.image_size = dataset.image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.items[i]]

    def fingerprint(self) -> str:
        """The data set's fingerprint, the part's name and its items."""
        return f"{self.dataset.fingerprint()}:{self.name}:{hash(tuple(self.items))}"


def labelled_split(
    source: str, image_size: int, split: str = "train", seed: int = 0, query_fraction: float = 0.2
) -> tuple[LabelledSubset, LabelledSubset] | None:
    """A labelled source cut into a reference and a query part, for ``twinview evaluate --data``.

    Each class gives a seeded ``query_fraction`` of its images (at least one, when it has two) to the
    query part and the rest to the reference part; unlabelled items go to neither.

    Returns:
        ``(reference, query)``, or None when the source has no labels.
    """
    dataset = open_images(source, image_size, split)
    if not dataset.index.labeled:
        return None
    labels = torch.tensor(dataset.index.labels)
    g = torch.Generator().manual_seed(seed)
    query: list[int] = []
    for c in labels.unique().tolist():
        if c < 0:
            continue
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        query += members[: max(1, round(query_fraction * len(members))) if len(members) > 1 else 0].tolist()
    reference = sorted(set((labels >= 0).nonzero().squeeze(1).tolist()) - set(query))
    return LabelledSubset(dataset, reference, "reference"), LabelledSubset(dataset, sorted(query), "query")


def random_init_backbone(cfg: Config) -> nn.Module:
    """A randomly initialised copy of the run's backbone (same architecture, seed ``train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    return create_backbone(cfg.model)


def evaluate_backbone(
    backbone: nn.Module,
    cfg: Config,
    reference: LabelledImages,
    query: LabelledImages,
    *,
    probe: bool = False,
    device: torch.device | None = None,
    accelerator: Any | None = None,
    plots_dir: Path | None = None,
    features_dir: Path | None = None,
) -> dict[str, Any]:
    """:func:`twinview.evaluate.run.evaluate` of ``backbone`` with the run's settings.

    The config gives the kNN settings and batch size (``eval``), the decoding workers and the image
    size (``data``), the recipe whose view alignment is measured (``augment``) and the probe's seed;
    the backbone gives its normalisation. The other arguments are passed on.
    """
    mean, std = normalization_stats(backbone)
    return evaluate(
        backbone,
        reference,
        query,
        cfg.eval,
        cfg.augment,
        cfg.data.size,
        mean,
        std,
        num_workers=cfg.data.num_workers,
        device=device,
        accelerator=accelerator,
        probe=probe,
        seed=cfg.train.seed,
        plots_dir=plots_dir,
        features_dir=features_dir,
    )


def absolute_source(source: str) -> str:
    """A local folder or file list as an absolute path (so the names written with the embeddings
    resolve from any working directory); other sources (``hf:...``, shard patterns) as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def embed_images(
    backbone: nn.Module,
    cfg: Config,
    source: str,
    out: Path,
    *,
    made_from: str,
    split: str = "train",
    dtype: str = "float32",
    overwrite: bool = False,
    accelerator: Any | None = None,
    progress: bool = True,
    dataset: LabelledImages | None = None,
    mirrored: bool = False,
    desc: str = "embed",
) -> EmbedSummary:
    """:func:`twinview.evaluate.embed.embed_source` of every image of ``source`` with the run's settings.

    Images are loaded at ``data.image_size`` with ``data.num_workers`` decoding workers and embedded
    ``eval.batch_size`` at a time, exactly as ``twinview evaluate`` extracts features; an image that
    cannot be decoded is listed in ``OUT.skipped.txt`` instead of being replaced.

    Args:
        backbone: The backbone to embed with.
        cfg: The run's config.
        source: Anything ``data.path`` accepts.
        out: ``.parquet`` or ``.npy`` file.
        made_from: The run directory or export, stored in the file's metadata.
        split: Split of a Hugging Face source.
        dtype: ``float32`` or ``float16`` in the file.
        overwrite: Replace an existing file.
        accelerator: Several processes (``accelerate launch``) split the images.
        progress: Show a progress bar.
        dataset: ``source`` already opened strict (see :func:`open_images`), else it is opened here.
        mirrored: Embed the mirror images instead (see :func:`~twinview.evaluate.embed.embed_source`).
        desc: The progress bar's label.
    """
    from twinview.evaluate.embed import embed_source
    from twinview.evaluate.features import state_checksum
    from twinview.pretrain import __version__
    from twinview.pretrain.data.decode import BadImage

    source = absolute_source(source)
    mean, std = normalization_stats(backbone)
    metadata = {
        "model": cfg.model.backbone,
        "made_from": made_from,
        "image_size": cfg.data.size,
        "weights": state_checksum(backbone),
        "source": source,
        "twinview": __version__,
    }
    return embed_source(
        backbone,
        dataset or open_images(source, cfg.data.size, split, strict=True),
        out,
        mean,
        std,
        metadata=metadata,
        dtype=dtype,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=accelerator.device if accelerator is not None else default_device(),
        accelerator=accelerator,
        skip_errors=(BadImage,),
        overwrite=overwrite,
        progress=progress,
        mirrored=mirrored,
        desc=desc,
    )


def evaluate_source(
    backbone: nn.Module,
    cfg: Config,
    source: str,
    out_dir: Path,
    *,
    made_from: str,
    split: str = "train",
    threshold: float | None = None,
    num_clusters: int | None = None,
    accelerator: Any | None = None,
    training_log: Path | None = None,
) -> dict[str, Any] | None:
    """The label-free evaluation (:func:`twinview.evaluate.unlabelled.evaluate_unlabelled`) of a
    source, for the trained backbone against a random-init copy, with the run's settings.

    The embeddings (trained, random init, and trained on the mirror images, for mirrored copies)
    are written to ``OUT_DIR/features/`` (Parquet, named by a hash of the data and the weights), so a
    second evaluation of the same images and weights reads them instead.

    Args:
        backbone: The trained backbone.
        cfg: The run's config (image size, views, workers, batch size, seed).
        source: Anything ``data.path`` accepts; labels, if any, are not used.
        out_dir: Where the CSV files, plots and embeddings go.
        made_from: The run directory or export, stored with the embeddings.
        split: Split of a Hugging Face source.
        threshold: Near-duplicate cosine threshold (None: the default).
        num_clusters: k of k-means (None: automatic).
        accelerator: Several processes (``accelerate launch``) split the embedding; only the main
            process scores and draws (the others return None).
        training_log: The run's ``metrics.jsonl``, to draw its training curves (None: not drawn).

    Returns:
        The label-free result on the main process; its plots are in ``OUT_DIR/plots/data/`` and the
        images that could not be decoded are listed in ``OUT_DIR/skipped_data.txt``.
    """
    import hashlib

    from twinview.evaluate.embed import skipped_file
    from twinview.evaluate.embedding_file import read_embedding_file
    from twinview.evaluate.features import state_checksum
    from twinview.evaluate.unlabelled import DUPLICATE_THRESHOLD, Embedded, evaluate_unlabelled

    source = absolute_source(source)
    dataset = open_images(source, cfg.data.size, split, strict=True)
    fingerprint = dataset.fingerprint()
    files, random_init = {}, random_init_backbone(cfg)
    for name, net, mirrored, desc in (
        ("pretrained", backbone, False, "embed 1/3 (trained)"),
        ("random_init", random_init, False, "embed 2/3 (random init)"),
        ("pretrained_mirrored", backbone, True, "embed 3/3 (trained, mirror images)"),  # for mirrored copies
    ):
        key = hashlib.sha256(f"{fingerprint}:{state_checksum(net)!r}:{mirrored}".encode()).hexdigest()[:16]
        files[name] = Path(out_dir) / "features" / f"{Path(source.rstrip('/')).name or 'data'}-{key}.parquet"
        if not files[name].is_file():
            files[name].parent.mkdir(parents=True, exist_ok=True)
            embed_images(
                net,
                cfg,
                source,
                files[name],
                made_from=made_from,
                split=split,
                accelerator=accelerator,
                dataset=dataset,
                mirrored=mirrored,
                desc=desc,
            )
    if accelerator is not None and not accelerator.is_main_process:
        return None
    skipped = Path(out_dir) / "skipped_data.txt"
    listed = skipped_file(files["pretrained"])
    if listed.is_file():
        shutil.copyfile(listed, skipped)
    else:
        skipped.unlink(missing_ok=True)
    embedded = [
        Embedded("pretrained", backbone, read_embedding_file(files["pretrained"])),
        Embedded("random_init", random_init, read_embedding_file(files["random_init"])),
    ]
    mean, std = normalization_stats(backbone)
    result = evaluate_unlabelled(
        embedded,
        dataset,
        cfg.augment,
        mean,
        std,
        out_dir,
        device=accelerator.device if accelerator is not None else default_device(),
        threshold=DUPLICATE_THRESHOLD if threshold is None else threshold,
        num_clusters=num_clusters,
        training_log=training_log,
        seed=cfg.train.seed,
        mirrored=read_embedding_file(files["pretrained_mirrored"]).embeddings,
    )
    if skipped.is_file():
        result["skipped_list"] = str(skipped)
    return {"source": source} | result


MAX_QUERIES = 1000  # search is for a few new images; embed a larger set with twinview embed


def search_images(
    backbone: nn.Module, cfg: Config, index: Path, query: str, k: int, grid: Path | None
) -> tuple[list[str], Hits, list[str]]:
    """Embeds the query image(s) as ``twinview embed`` did the index, and searches the index.

    Args:
        backbone: The backbone that made the index.
        cfg: Its run's config (image size, batch size).
        index: An embedding file written by ``twinview embed``.
        query: An image file, or a folder / file list of at most ``MAX_QUERIES`` images.
        k: Neighbours per query.
        grid: Draw the queries and their neighbours there (PNG), when given.

    Returns:
        The query names, the :class:`~twinview.evaluate.search.Hits`, and warnings (e.g. an index
        made by other weights).
    """
    from twinview.augment.views import Normalize
    from twinview.evaluate.embedding_file import read_metadata
    from twinview.evaluate.features import frozen_forward, state_checksum
    from twinview.evaluate.search import search
    from twinview.pretrain.data.decode import BadImage
    from twinview.pretrain.data.sources import IMAGE_EXTENSIONS, load_image

    if not Path(index).is_file():
        raise FileNotFoundError(f"--index '{index}' does not exist (write one with twinview embed).")
    warnings = []
    made_by = read_metadata(index)
    size = int(made_by.get("image_size", cfg.data.size))
    if made_by.get("weights") not in (None, state_checksum(backbone)):
        raise ValueError(
            f"--index '{index}' was made by other weights ({made_by.get('made_from')}): search it with that "
            "model, or embed the images again with this one."
        )
    path = Path(query)
    if not path.exists() and not query.startswith("hf:"):
        raise FileNotFoundError(f"--query '{query}' does not exist.")
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            names, images = [str(path)], load_image(path, size)[None]
        except BadImage as err:
            raise BadImage(f"--query '{path}': {err}") from None
    else:
        dataset = open_images(absolute_source(query), size, strict=True)
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
    device = default_device()
    backbone.eval().to(device)
    mean, std = normalization_stats(backbone)
    normalize = Normalize(mean, std).to(device)
    batches = images.split(cfg.eval.batch_size)
    features = torch.cat([frozen_forward(backbone, normalize, b, device).cpu() for b in batches])
    hits = search(features, index, k)
    if grid is not None:
        from twinview.evaluate.plots import self_neighbour_grid

        def tile(name: str) -> torch.Tensor:
            file = Path(name)
            return load_image(file, size) if file.is_file() else torch.full((3, size, size), 128, dtype=torch.uint8)

        self_neighbour_grid(
            list(images), [[tile(n) for n in row] for row in hits.names], hits.similarities, grid, f"nearest in {index}"
        )
    return names, hits, warnings
