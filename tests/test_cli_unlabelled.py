"""The label-free path as a user runs it: pretrain on an unlabeled folder -> embed -> evaluate --data
(report.html, duplicates.csv, clusters.csv) -> search; and embed equals evaluate's features."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.browser import BrowserPage
from twinview.evaluate.embedding_file import read_embedding_file
from twinview.pretrain.app.cli import main

from .conftest import make_image_folder
from .test_cli import TINY as CLI_TINY

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

TINY = [*CLI_TINY, "eval.batch_size=16"]


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run pretrained on a flat folder of 24 images plus planted copies (an exact one and a flip),
    a one-colour image and a tiny one."""
    root = tmp_path_factory.mktemp("unlabelled")
    labelled = make_image_folder(root / "labelled")
    folder = root / "photos"
    folder.mkdir()
    for i, f in enumerate(sorted(labelled.rglob("*.png"))):
        shutil.copy(f, folder / f"img_{i:03d}.png")
    shutil.copy(folder / "img_005.png", folder / "copy_of_005.png")  # the same bytes
    Image.open(folder / "img_017.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "flip_of_017.png")
    Image.new("RGB", (24, 24), (200, 30, 30)).save(folder / "blank.png")  # one colour: flagged near-constant
    noise = np.random.default_rng(1).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "tiny.png")  # 5 px, under a quarter of the others' 24: flagged tiny
    runs = root / "runs"
    args = ["pretrain", "--config", "simclr-cifar10", f"data.path={folder}", f"train.output_dir={runs}"]
    assert main([*args, "train.run_name=u", *TINY]) == 0
    return runs / "u", folder


def test_embed_evaluate_search(
    unlabelled_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, folder = unlabelled_run
    out = tmp_path / "photos.parquet"
    assert main(["embed", str(run_dir), "--data", str(folder), "--out", str(out)]) == 0
    rows = read_embedding_file(out)
    assert len(rows.names) == 28 and rows.labels is None and rows.embeddings.shape[1] == 512

    assert main(["evaluate", str(run_dir), "--data", str(folder), "--duplicate-threshold", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "near-duplicates" in printed
    result = json.loads((run_dir / "eval.json").read_text())["label_free"]
    assert result["num_images"] == 28 and result["skipped"] == 0
    assert {"pretrained", "random_init"} <= result.keys()
    with (run_dir / "duplicates.csv").open() as f:
        pairs = {(Path(r["path_a"]).name, Path(r["path_b"]).name): r for r in csv.DictReader(f)}
    copy = ("copy_of_005.png", "img_005.png")
    assert pairs[copy]["exact"] in ("True", "true", "1") and float(pairs[copy]["similarity"]) > 0.999
    assert all(r["exact"] in ("False", "false", "0") for k, r in pairs.items() if k != copy)
    mirror = ("flip_of_017.png", "img_017.png")  # found through the mirror images' embeddings
    assert float(pairs[mirror]["similarity"]) > 0.999 and result["duplicates"]["mirror_invariant"]
    for pair in (copy, mirror):  # found by the perceptual hashes too (distance 0: the mirror's hash)
        assert "hash" in pairs[pair]["rule"].split("+") and pairs[pair]["hash_distance"] == "0"
    with (run_dir / "clusters.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 28
    with (run_dir / "outliers.csv").open() as f:
        ranked = list(csv.DictReader(f))
    assert len(ranked) == 28 and [float(r["uniqueness_k10"]) for r in ranked] == sorted(
        (float(r["uniqueness_k10"]) for r in ranked), reverse=True
    )
    flags = {Path(r["path"]).name: r["flags"] for r in ranked}
    assert flags["blank.png"] == "near-constant" and flags["tiny.png"] == "tiny"
    assert {n for n, f in flags.items() if f} == {"blank.png", "tiny.png"}
    assert result["outliers"]["near_constant"] == 1 and result["outliers"]["tiny"] == 1
    page = (run_dir / "report.html").read_text()
    assert "Near-duplicates" in page and "Outliers" in page and "Clusters" in page and 'src="plots/' not in page
    for key in (
        "neighbours",
        "random_neighbours",
        "duplicates",
        "outliers",
        "clusters",
        "similarity",
        "embeddings",
        "training",
    ):
        assert Path(result["plots"][key]).is_file(), key

    # the random-init embeddings of evaluate come from the same engine: embed reproduces them
    cached = sorted((run_dir / "features").glob("photos-*.parquet"))
    assert len(cached) == 3  # trained, random init, trained on the mirror images
    assert any(torch.equal(read_embedding_file(c).embeddings, rows.embeddings) for c in cached)

    grid = tmp_path / "search.png"
    query = folder / "img_017.png"
    assert (
        main(["search", str(run_dir), "--index", str(out), "--query", str(query), "--k", "3", "--out", str(grid)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(query)
    rank, sim, path = lines[1].split()
    assert rank == "1" and path == str(query) and float(sim) == pytest.approx(1.0, abs=1e-4)
    assert len(lines) == 5 and np.asarray(Image.open(grid)).std() > 0

    # the explorer: written beside the report and linked from it; a click on the query's point in a
    # real browser lists the neighbours that twinview search finds (after the query itself)
    assert f"explorer: {run_dir / 'explorer.html'}" in printed
    assert result["explorer"]["page"] == str(run_dir / "explorer.html")
    assert 'href="explorer.html"' in (run_dir / "report.html").read_text()
    chromium = shutil.which("chromium")
    if chromium is None:  # tests/evaluate/test_explorer_browser.py says why it skips
        return
    assert (
        main(["search", str(run_dir), "--index", str(out), "--query", str(query), "--k", "11", "--out", str(grid)]) == 0
    )
    found = [line.split() for line in capsys.readouterr().out.splitlines()[2:12]]  # after the query and itself
    expected = [(path, float(sim)) for _, sim, path in found]
    names = [str(n) for n in rows.names]
    with BrowserPage(chromium, tmp_path / "profile", run_dir / "explorer.html") as view:
        view.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        row = names.index(str(query))
        x, y = view.evaluate(f"explorer.position({row})")
        view.click(x, y)
        assert view.evaluate("explorer.selected()") == row
        listed = view.evaluate(
            "Array.from(document.querySelectorAll('#neighbours li'), li => "
            "[Number(li.dataset.row), Number(li.querySelector('.sim').textContent)])"
        )
        assert view.problems == []
    shown = [(names[r], s) for r, s in listed]
    assert len(shown) == 10  # k on the page: 10 (search was asked for 11, the first being the query itself)
    assert np.allclose([s for _, s in shown], [s for _, s in expected], atol=2e-4)

    def by_tie(hits: list[tuple[str, float]]) -> list[set[str]]:  # ties (a byte copy) in either order
        return [{n for n, s in hits if abs(s - t) < 1e-4} for _, t in hits]

    assert by_tie(shown) == by_tie(expected)


def test_embed_equals_the_features_evaluate_caches(image_folder: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["pretrain", "--config", "simclr-cifar10", f"data.path={image_folder}", f"train.output_dir={runs}"]
    assert main([*args, "train.run_name=l", *TINY]) == 0
    run_dir = runs / "l"
    assert main(["evaluate", str(run_dir), "--train", str(image_folder), "--test", str(image_folder)]) == 0
    cached = torch.load(next((run_dir / "features").glob("*.pt")))
    assert main(["embed", str(run_dir), "--data", str(image_folder), "--out", str(tmp_path / "e.npy")]) == 0
    rows = read_embedding_file(tmp_path / "e.npy")
    torch.testing.assert_close(rows.embeddings, cached["features"], rtol=0, atol=0)
    assert rows.labels == [f"class_{int(y)}" for y in cached["labels"]]


def test_evaluate_needs_data_or_a_labelled_pair(
    unlabelled_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", str(unlabelled_run[0])]) == 2
    assert "--data" in capsys.readouterr().err


def test_mirror_invariant_embeddings_do_not_change_when_the_image_is_mirrored() -> None:
    from twinview.evaluate.unlabelled import mirror_invariant

    g = torch.Generator().manual_seed(0)
    f, f_mirror = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g) * 3
    torch.testing.assert_close(mirror_invariant(f, f_mirror), mirror_invariant(f_mirror, f))
    expected = f / f.norm(dim=1, keepdim=True) + f_mirror / f_mirror.norm(dim=1, keepdim=True)
    torch.testing.assert_close(mirror_invariant(f, f_mirror), expected)


def test_labels_and_no_labels_together_keep_their_own_plots_and_export_still_works(
    unlabelled_run: tuple[Path, Path], image_folder: Path, tmp_path: Path
) -> None:
    run_dir, folder = unlabelled_run
    both = ["evaluate", str(run_dir), "--data", str(folder), "--train", str(image_folder), "--test", str(image_folder)]
    assert main([*both, "eval.knn_k=5"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    labelled_plots = {Path(p).relative_to(run_dir).as_posix() for p in result["pretrained"]["plots"]}
    assert labelled_plots == {"plots/embeddings.png", "plots/neighbours.png", "plots/training.png"}
    assert all(Path(p).parent == run_dir / "plots" / "data" for p in result["label_free"]["plots"].values())
    assert "training" not in result["label_free"]["plots"]  # drawn once, by the labelled part
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "kNN top-1" in card and "effective rank (RankMe)" in card
    shipped = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert main(["evaluate", str(tmp_path / "export"), "--data", str(folder), "--out", str(tmp_path / "ev")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == shipped  # the export stays as shipped
    assert (tmp_path / "ev" / "report.html").is_file() and (tmp_path / "ev" / "duplicates.csv").is_file()


def test_a_labelled_data_folder_also_gets_knn_on_a_seeded_split(image_folder: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["pretrain", "--config", "simclr-cifar10", f"data.path={image_folder}", f"train.output_dir={runs}"]
    assert main([*args, "train.run_name=l", *TINY]) == 0
    assert main(["evaluate", str(runs / "l"), "--data", str(image_folder), "eval.knn_k=5"]) == 0
    result = json.loads((runs / "l" / "eval.json").read_text())
    assert result["pretrained"]["num_train"] == 18 and result["pretrained"]["num_test"] == 6  # 2 of 8 per class
    assert "random_init" in result and result["label_free"]["num_images"] == 24


@pytest.mark.parametrize(
    "options,message",
    [
        (["--train", "x"], "--train and --test go together"),
        (["--clusters", "0"], "--clusters must be at least 1"),
        (["--duplicate-threshold", "1.5"], "--duplicate-threshold is a cosine similarity"),
    ],
)
def test_option_mistakes_are_refused_before_any_work(
    unlabelled_run: tuple[Path, Path], capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    run_dir, folder = unlabelled_run
    assert main(["evaluate", str(run_dir), "--data", str(folder), *options]) == 2
    assert message in capsys.readouterr().err


def test_search_lists_a_broken_query_instead_of_answering_for_its_neighbour(
    unlabelled_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, folder = unlabelled_run
    monkeypatch.chdir(folder.parent)  # a relative --data: the file still names absolute paths
    assert main(["embed", str(run_dir), "--data", folder.name, "--out", str(tmp_path / "i.parquet")]) == 0
    assert all(Path(n).is_absolute() for n in read_embedding_file(tmp_path / "i.parquet").names)
    queries = tmp_path / "q"
    queries.mkdir()
    shutil.copy(folder / "img_003.png", queries / "a.png")
    (queries / "zz_broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["search", str(run_dir), "--index", str(tmp_path / "i.parquet"), "--query", str(queries)]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "zz_broken.png" in captured.err
    assert "zz_broken.png" not in captured.out and str(queries / "a.png") in captured.out


def test_an_interrupted_embed_says_how_to_continue(
    unlabelled_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import twinview.pretrain.app.embedding as embedding

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(embedding, "embed_images", interrupted)
    run_dir, folder = unlabelled_run
    assert main(["embed", str(run_dir), "--data", str(folder), "--out", str(tmp_path / "e.parquet")]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err


def _evaluate_worker(rank: int, run_dir: str, folder: str, port: int) -> None:
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    assert main(["evaluate", run_dir, "--data", folder, "train.cpu=true"]) == 0


def test_two_processes_write_the_same_label_free_report(unlabelled_run: tuple[Path, Path], tmp_path: Path) -> None:
    import os

    import torch.multiprocessing as mp

    run_dir, folder = unlabelled_run
    one, two = tmp_path / "one", tmp_path / "two"
    for copy in (one, two):
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("features", "plots", "checkpoints"))
    assert main(["evaluate", str(one), "--data", str(folder)]) == 0
    port = 29500 + (os.getpid() + 11) % 1000
    mp.spawn(_evaluate_worker, args=(str(two), str(folder), port), nprocs=2, join=True)
    a, b = (json.loads((d / "eval.json").read_text())["label_free"] for d in (one, two))
    for backbone in ("pretrained", "random_init"):
        assert a[backbone]["diagnostics"]["effective_rank"] == pytest.approx(
            b[backbone]["diagnostics"]["effective_rank"]
        )
    assert (one / "duplicates.csv").read_text() == (two / "duplicates.csv").read_text()
    assert (one / "clusters.csv").read_text() == (two / "clusters.csv").read_text()


def test_leaks_between_two_unlabeled_splits(
    unlabelled_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``twinview leaks``: a byte copy and a mirrored copy of training images in the test split are
    listed with their training images; images of their own are not."""
    run_dir, folder = unlabelled_run
    test = tmp_path / "test"
    test.mkdir()
    shutil.copy(folder / "img_003.png", test / "same_as_003.png")
    Image.open(folder / "img_010.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(test / "flip_of_010.png")
    rng = np.random.default_rng(7)
    for i in range(4):  # images of their own (noise: no pHash near a training image's)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(test / f"own_{i}.png")
    out = tmp_path / "leaks"
    # a one-epoch model puts every image near every other, so the cosine rule is made strict here
    command = ["leaks", str(run_dir), "--train", str(folder), "--test", str(test), "--out", str(out)]
    assert main([*command, "--duplicate-threshold", "0.99999"]) == 0
    printed = capsys.readouterr().out
    assert "backbone: the run's trained backbone" in printed and "2 of 6 test images (33.3%)" in printed
    with (out / "leaks.csv").open() as f:
        rows = {Path(r["test_image"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {"same_as_003.png", "flip_of_010.png"}
    assert (
        Path(rows["same_as_003.png"]["train_image"]).name == "img_003.png"
        and rows["same_as_003.png"]["exact"] == "true"
    )
    assert Path(rows["flip_of_010.png"]["train_image"]).name == "img_010.png"
    assert rows["flip_of_010.png"]["exact"] == "false" and "hash" in rows["flip_of_010.png"]["rule"]
    # the explorer shows both splits, the leaked test images and their training twins flagged
    assert f"explorer: {out / 'explorer.html'}" in printed
    data = _explorer_data(out / "explorer.html")
    names = [data["prefix"] + n for n in data["names"]]
    assert data["groupKind"] == "split" and data["groupNames"] == ["train (28 images)", "test (6 images)"]
    assert [data["group"][names.index(str(test / f"own_{i}.png"))] for i in range(4)] == [1] * 4
    flagged = {Path(names[r]).name for r in data["flags"]["leaks"]}
    assert flagged == {"same_as_003.png", "img_003.png", "flip_of_010.png", "img_010.png"}
    assert (
        "leaked: a near-duplicate of training image img_003.png"
        in data["notes"][names.index(str(test / "same_as_003.png"))]
    )


def _explorer_data(page: Path) -> dict[str, Any]:
    """The JSON an explorer page reads."""
    text = page.read_text()
    start = text.index('id="explorer-data">') + len('id="explorer-data">')
    data: dict[str, Any] = json.loads(text[start : text.index("</script>", start)])
    return data


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_embed_writes_a_faiss_index_that_search_uses(
    unlabelled_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install twinview[scale])")
    run_dir, folder = unlabelled_run
    exact, indexed = tmp_path / "exact.parquet", tmp_path / "indexed.parquet"
    assert main(["embed", str(run_dir), "--data", str(folder), "--out", str(exact)]) == 0
    assert main(["embed", str(run_dir), "--data", str(folder), "--out", str(indexed), "--index", kind]) == 0
    assert f"Wrote a faiss {kind.upper()} index to {indexed}.faiss" in capsys.readouterr().out

    def search(index: Path) -> tuple[list[str], str]:
        query = ["--query", str(folder / "img_017.png"), "--k", "5", "--out", str(tmp_path / "s.png")]
        assert main(["search", str(run_dir), "--index", str(index), *query]) == 0
        captured = capsys.readouterr()
        return [line.rsplit(maxsplit=1)[-1] for line in captured.out.splitlines()[1:6]], captured.err

    by_exact, said = search(exact)
    assert "search: exact" in said
    by_index, said = search(indexed)
    assert f"search: faiss {kind.upper()} index indexed.parquet.faiss (28 rows)" in said
    assert by_index == by_exact  # 28 rows: one IVF cell, or every HNSW node visited
    # the same embeddings written again keep their index; another version of the file is refused
    assert main(["embed", str(run_dir), "--data", str(folder), "--out", str(indexed), "--overwrite"]) == 0
    capsys.readouterr()
    assert search(indexed)[0] == by_exact
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in ("img_000.png", "img_017.png", "img_020.png"):
        shutil.copy(folder / name, fewer / name)
    assert main(["embed", str(run_dir), "--data", str(fewer), "--out", str(indexed), "--overwrite"]) == 0
    query = ["--query", str(folder / "img_017.png"), "--out", str(tmp_path / "s.png")]
    assert main(["search", str(run_dir), "--index", str(indexed), *query]) == 2
    assert "indexes an earlier version" in capsys.readouterr().err
