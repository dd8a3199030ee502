"""``twinview embed``'s engine: rows equal evaluation's features, chunked, resumable, bad files listed,
two processes equal one, and files that pandas and ``datasets`` read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from twinview.evaluate.embed import embed_source, parts_dir, skipped_file
from twinview.evaluate.embedding_file import read_embedding_file, read_metadata
from twinview.evaluate.features import Embedder, extract_features
from twinview.pretrain.data.decode import BadImage
from twinview.pretrain.data.folder import ImageFolderDataset
from twinview.pretrain.data.source import scan_source

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SAME = {"rtol": 1e-6, "atol": 1e-6}  # the same forward; batches of other sizes round the last bit differently


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def embedder(net: torch.nn.Module | None = None, accelerator: object = None) -> Embedder:
    return Embedder(net or tiny_net(), MEAN, STD, batch_size=4, num_workers=0, accelerator=accelerator)


def embed(dataset: ImageFolderDataset, out: Path, accelerator: object = None, **kwargs: object) -> object:
    options: dict = {"metadata": {"model": "tiny"}, "chunk_rows": 5}
    options.update(kwargs)
    return embed_source(embedder(accelerator=accelerator), dataset, out, skip_errors=(BadImage,), **options)


def reference_features(folder: Path) -> torch.Tensor:
    features, _ = extract_features(
        tiny_net(), ImageFolderDataset(scan_source(folder), 16), MEAN, STD, batch_size=7, num_workers=0
    )
    return features


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_rows_equal_the_features_evaluate_computes(image_folder: Path, tmp_path: Path, suffix: str) -> None:
    dataset = ImageFolderDataset(scan_source(image_folder), 16, strict=True)  # 24 images: chunks of 5, batches of 4
    summary = embed(dataset, tmp_path / f"emb{suffix}")
    rows = read_embedding_file(tmp_path / f"emb{suffix}")
    assert summary.rows == 24 and summary.dims == 6 and not summary.skipped
    assert rows.names == [str(f) for f in dataset.index.files]
    assert rows.labels == [dataset.index.classes[y] for y in dataset.index.labels]
    torch.testing.assert_close(rows.embeddings, reference_features(image_folder), **SAME)
    assert read_metadata(tmp_path / f"emb{suffix}")["model"] == "tiny"
    assert not parts_dir(tmp_path / f"emb{suffix}").exists()


def test_float16_file_and_other_readers(image_folder: Path, tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    embed(ImageFolderDataset(scan_source(image_folder), 16, strict=True), tmp_path / "emb.parquet", dtype="float16")
    expected = reference_features(image_folder)
    frame = pd.read_parquet(tmp_path / "emb.parquet")
    assert list(frame.columns) == ["path", "embedding", "label"] and frame.embedding[0].dtype == np.float16
    np.testing.assert_array_equal(np.stack(frame.embedding.to_list()), expected.half().numpy())
    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "emb.parquet"), split="train")
    assert len(hf) == 24 and hf[3]["path"] == frame.path[3] and len(hf[3]["embedding"]) == 6


class Interrupting(ImageFolderDataset):
    """Raises KeyboardInterrupt when row ``stop_at`` is read, as Ctrl-C would."""

    stop_at = -1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.stop_at:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_an_interrupted_embed_continues_where_it_stopped(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    dataset = Interrupting(scan_source(image_folder), 16, strict=True)
    dataset.stop_at = 12  # chunks 0-4 and 5-9 are written, 10-14 is not
    with pytest.raises(KeyboardInterrupt):
        embed(dataset, out)
    assert sorted(p.name for p in parts_dir(out).glob("part-*")) == [
        "part-000000.safetensors",
        "part-000001.safetensors",
    ]
    assert not out.exists()
    dataset.stop_at = 3  # a row of a finished chunk: never read again
    summary = embed(dataset, out)
    assert summary.chunks_done_before == 2 and summary.rows == 24  # type: ignore[attr-defined]
    torch.testing.assert_close(read_embedding_file(out).embeddings, reference_features(image_folder), **SAME)


def test_parts_of_other_weights_are_not_mixed_in(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    dataset = Interrupting(scan_source(image_folder), 16, strict=True)
    dataset.stop_at = 12
    with pytest.raises(KeyboardInterrupt):
        embed(dataset, out)
    other = tiny_net()
    torch.nn.init.zeros_(other[0].bias)
    with pytest.raises(ValueError, match="other weights"):
        embed_source(embedder(other), ImageFolderDataset(scan_source(image_folder), 16, strict=True), out, metadata={})
    embed(ImageFolderDataset(scan_source(image_folder), 16, strict=True), tmp_path / "done.parquet")
    with pytest.raises(FileExistsError):  # a finished file is not replaced silently
        embed(ImageFolderDataset(scan_source(image_folder), 16, strict=True), tmp_path / "done.parquet")


def test_bad_files_get_no_row_and_are_listed(image_folder: Path, tmp_path: Path) -> None:
    bad = sorted(image_folder.rglob("*.png"))[7]
    bad.write_bytes(b"not an image")
    out = tmp_path / "emb.npy"
    summary = embed(ImageFolderDataset(scan_source(image_folder), 16, strict=True), out)
    rows = read_embedding_file(out)
    assert summary.rows == 23 and str(bad) not in rows.names  # type: ignore[attr-defined]
    assert list(summary.skipped) == [str(bad)]  # type: ignore[attr-defined]
    assert skipped_file(out).read_text().startswith(f"{bad}\t")
    bad.unlink()  # the reference: the same images without the bad one
    torch.testing.assert_close(rows.embeddings, reference_features(image_folder), **SAME)


def _worker(rank: int, folder: str, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    embed(ImageFolderDataset(scan_source(folder), 16, strict=True), Path(out), accelerator=accelerator, progress=False)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_split_the_chunks_and_write_the_same_file(image_folder: Path, tmp_path: Path) -> None:
    port = 29500 + (os.getpid() + 7) % 1000
    mp.spawn(_worker, args=(str(image_folder), port, str(tmp_path / "two.parquet")), nprocs=2, join=True)
    embed(ImageFolderDataset(scan_source(image_folder), 16, strict=True), tmp_path / "one.parquet")
    two, one = read_embedding_file(tmp_path / "two.parquet"), read_embedding_file(tmp_path / "one.parquet")
    assert two.names == one.names and two.labels == one.labels
    torch.testing.assert_close(two.embeddings, one.embeddings, rtol=0, atol=0)
