"""``twinview embed``: the backbone embedding of every image of a source, written as it goes.

The source's rows are cut into fixed chunks. Each process (several under ``accelerate launch``)
takes the chunks ``c = rank (mod world)``, embeds them in row order with the forward every other
command uses (:func:`twinview.evaluate.features.frozen_forward`), and writes each finished chunk as a
part file in ``OUT.parts/``. An interrupted embed started again with the same arguments skips the
parts already written. When every chunk is done, the main process merges the parts in row order
into OUT (:mod:`twinview.evaluate.embedding_file`) and removes ``OUT.parts/``. Memory is one chunk,
whatever the number of images.

An image that cannot be decoded gets no row; it is listed with its reason in ``OUT.skipped.txt``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from twinview.augment.views import Normalize
from twinview.evaluate.dataset import LabelledImages
from twinview.evaluate.embedding_file import Part, file_format, write_embedding_file
from twinview.evaluate.features import Embedder, frozen_forward, quiet_worker
from twinview.evaluate.progress import Progress

CHUNK_ROWS = 4096  # rows per part file: what a restarted embed may have to redo
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EmbedSummary:
    """What :func:`embed_source` did.

    Attributes:
        out: The embedding file (only complete on the main process).
        rows: Rows written (images embedded).
        dims: Embedding width.
        skipped: Skipped file (or row id) -> reason.
        chunks_done_before: Chunks found already written (a resumed embed).
        seconds: Wall time of this call.
    """

    out: Path
    rows: int
    dims: int
    skipped: dict[str, str] = field(default_factory=dict)
    chunks_done_before: int = 0
    seconds: float = 0.0


class _Rows(Dataset):
    """Items ``(uint8 image, row, ok)`` of a data set; a row whose image fails gets ``ok=False``.

    The data set must raise on a bad image (opened strict), not replace it with the next one, so
    that every row is the image its name says.
    """

    def __init__(self, dataset: LabelledImages, skip_errors: tuple[type[BaseException], ...]) -> None:
        self.dataset, self.skip_errors = dataset, skip_errors
        self.blank = torch.zeros(3, dataset.image_size, dataset.image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.dataset[i][0], i, ""
        except self.skip_errors as err:
            return self.blank, i, getattr(err, "reason", "") or str(err) or type(err).__name__


def parts_dir(out: Path) -> Path:
    """``OUT.parts/``: the finished chunks of an embed in progress."""
    return Path(out).with_name(Path(out).name + ".parts")


def skipped_file(out: Path) -> Path:
    """``OUT.skipped.txt``: ``name<TAB>reason`` per image that could not be decoded."""
    return Path(out).with_name(Path(out).name + ".skipped.txt")


def _part(parts: Path, chunk: int) -> Path:
    return parts / f"part-{chunk:06d}.safetensors"


def chunk_batches(chunks: Sequence[int], num_rows: int, chunk_rows: int, batch_size: int) -> list[list[int]]:
    """Batches of row numbers of the given chunks, in order; no batch crosses a chunk boundary."""
    batches = []
    for c in chunks:
        rows = range(c * chunk_rows, min((c + 1) * chunk_rows, num_rows))
        batches += [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def _prepare_parts(
    out: Path, manifest: dict[str, Any], overwrite: bool, main_process: bool, accelerator: Any | None
) -> int:
    """Creates ``OUT.parts/`` with its manifest, or checks that the one found belongs to this embed.

    Returns:
        The number of chunks already written.

    Raises:
        FileExistsError: If OUT exists and ``overwrite`` is False.
        ValueError: If ``OUT.parts/`` was left by an embed of other data, weights or settings.
    """
    parts = parts_dir(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' exists; choose another --out or pass --overwrite.")
    found = parts / MANIFEST
    if found.is_file():
        before = json.loads(found.read_text())
        differs = [k for k in manifest if before.get(k) != manifest[k]]
        if differs and not overwrite:
            raise ValueError(
                f"'{parts}' holds an unfinished embed with other {', '.join(differs)}; rerun that command "
                "to finish it, delete the folder, or pass --overwrite."
            )
        if differs and main_process:
            shutil.rmtree(parts)
    if main_process:
        parts.mkdir(parents=True, exist_ok=True)
        (parts / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return len(list(parts.glob("part-*.safetensors")))


@torch.no_grad()
def embed_source(
    embedder: Embedder,
    dataset: LabelledImages,
    out: Path,
    *,
    metadata: dict[str, Any],
    dtype: str = "float32",
    chunk_rows: int = CHUNK_ROWS,
    skip_errors: tuple[type[BaseException], ...] = (),
    overwrite: bool = False,
    progress: bool = True,
    mirrored: bool = False,
    desc: str = "embed",
) -> EmbedSummary:
    """Embeds every image of ``dataset`` into ``out`` (``.parquet`` or ``.npy``), resumably.

    Args:
        embedder: The frozen backbone (its weights are not changed), its normalisation, batch
            size, decoding workers and device; several processes (its ``accelerator``) split the chunks.
        dataset: The images, opened so that a bad image raises one of ``skip_errors``.
        out: The embedding file; its suffix picks the format.
        metadata: What made the embedding (model, image size, source), stored in the file.
        dtype: ``float32`` or ``float16`` in the file.
        chunk_rows: Rows per part file.
        skip_errors: Exceptions of a bad image; such images are listed, not embedded.
        overwrite: Replace an existing OUT (and an unfinished embed of other settings).
        progress: Show a progress bar (main process only).
        mirrored: Embed each image's mirror image (flipped left-right) instead; the label-free
            evaluation compares both to find mirrored copies.
        desc: The progress bar's label.

    Returns:
        An :class:`EmbedSummary`.
    """
    started = time.perf_counter()
    out = Path(out)
    file_format(out)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype '{dtype}' is not one of float32, float16.")
    accelerator, backbone, device = embedder.accelerator, embedder.backbone, torch.device(embedder.device)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    main_process = rank == 0
    num_rows = len(dataset)
    manifest = {
        "data": dataset.fingerprint(),
        "weights": embedder.weights(),
        "rows": num_rows,
        "chunk_rows": chunk_rows,
        "dtype": dtype,
        "mirrored": mirrored,
    }
    done_before = _prepare_parts(out, manifest, overwrite, main_process, accelerator)
    parts = parts_dir(out)
    num_chunks = -(-num_rows // chunk_rows)
    mine = [c for c in range(rank, num_chunks, world) if not _part(parts, c).is_file()]
    was_training = backbone.training
    backbone.eval().to(device)
    normalize = Normalize(embedder.mean, embedder.std).to(device)
    batches = chunk_batches(mine, num_rows, chunk_rows, embedder.batch_size)
    loader: DataLoader[Any] = DataLoader(
        _Rows(dataset, skip_errors),
        batch_sampler=batches,
        num_workers=embedder.num_workers if batches else 0,
        worker_init_fn=quiet_worker if embedder.num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    bar = Progress(sum(map(len, batches)), desc, unit="img", enabled=progress and main_process)
    pending: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for images, rows, errors in loader:
        images = images.flip(-1) if mirrored else images  # (B, 3, S, S): left-right
        pending.append((frozen_forward(backbone, normalize, images, device).cpu(), rows, list(errors)))
        bar.update(len(rows))
        chunk = int(rows[-1]) // chunk_rows
        if int(rows[-1]) + 1 == min((chunk + 1) * chunk_rows, num_rows):  # the chunk's last row
            _write_part(_part(parts, chunk), pending, dtype)
            pending = []
    bar.close()
    backbone.train(was_training)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    dims, rows_written, skipped = _summarise(parts, num_chunks, dataset)
    if main_process:
        write_embedding_file(
            out,
            _merged_parts(parts, num_chunks, dataset),
            dims,
            dtype,
            metadata | {"dtype": dtype, "mirrored": mirrored},
            rows_written,
        )
        _write_skipped(out, skipped)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main_process:
        shutil.rmtree(parts)
    return EmbedSummary(out, rows_written, dims, skipped, done_before, time.perf_counter() - started)


def _write_part(path: Path, pending: list[tuple[torch.Tensor, torch.Tensor, list[str]]], dtype: str) -> None:
    """One finished chunk: embeddings of its good rows, their row numbers, and the bad rows' reasons."""
    features = torch.cat([f for f, _, _ in pending])
    rows = torch.cat([r for _, r, _ in pending]).long()
    errors = [e for _, _, errs in pending for e in errs]
    ok = torch.tensor([not e for e in errors])
    bad = {str(int(r)): e for r, e in zip(rows.tolist(), errors, strict=True) if e}
    tmp = path.with_suffix(".tmp")
    save_file(
        {"embedding": features[ok].to(getattr(torch, dtype)).contiguous(), "row": rows[ok].contiguous()},
        str(tmp),
        metadata={"skipped": json.dumps(bad)},
    )
    tmp.replace(path)  # a part exists only once complete


def _read_part(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's embeddings and row numbers (its skipped rows are read by :func:`_summarise`)."""
    tensors = load_file(str(path))
    return tensors["embedding"], tensors["row"]


def _summarise(parts: Path, num_chunks: int, dataset: LabelledImages) -> tuple[int, int, dict[str, str]]:
    """Width, rows and skipped images over all parts (reads the parts' headers and row numbers)."""
    from safetensors import safe_open

    dims, rows = 0, 0
    skipped: dict[str, str] = {}
    for c in range(num_chunks):
        with safe_open(str(_part(parts, c)), "pt") as f:
            shape = f.get_slice("embedding").get_shape()
            bad = json.loads((f.metadata() or {}).get("skipped", "{}"))
        rows += shape[0]
        dims = shape[1]
        skipped |= {str(dataset.index.files[int(r)]): reason for r, reason in bad.items()}
    return dims, rows, skipped


def _merged_parts(parts: Path, num_chunks: int, dataset: LabelledImages) -> Iterator[Part]:
    """The parts in row order as ``(names, embeddings, labels)``, one at a time."""
    index = dataset.index
    for c in range(num_chunks):
        embeddings, rows = _read_part(_part(parts, c))
        names = [str(index.files[r]) for r in rows.tolist()]
        labels = [index.classes[index.labels[r]] if index.labels[r] >= 0 else "" for r in rows.tolist()]
        yield names, embeddings.numpy(), labels if index.labeled else None


def _write_skipped(out: Path, skipped: dict[str, str]) -> None:
    path = skipped_file(out)
    if skipped:
        path.write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped.items()))
    elif path.exists():
        path.unlink()
