"""The evaluation report: sections of a labelled and of a label-free result, their Markdown, and the
self-contained HTML page (figures inlined as base64, text escaped, a missing figure a note)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
from PIL import Image

from twinview.evaluate.report import (
    MISSING,
    READING_GUIDE,
    Section,
    Table,
    label_free_sections,
    labelled_sections,
    write_html,
    write_markdown,
    write_report,
)
from twinview.evaluate.results import (
    ClusterSizes,
    Diagnostics,
    DuplicatePairs,
    KnnResult,
    LabelFreeResult,
    LabelledResult,
    ProbeResult,
    SimilarityStats,
    Spread,
)


def _png(path: Path, seed: int) -> Path:
    """A small noise image (different bytes per seed) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _labelled(plots: list[str] | None = None, warning: str | None = None, probe: bool = True) -> LabelledResult:
    return LabelledResult(
        knn=KnnResult(0.91234, 0.99, k=5, temperature=0.1, num_reference=24, num_query=12),
        retrieval={"recall@1": 0.5, "map@r": 0.25},
        verification={"roc_auc": 0.75},
        diagnostics=Diagnostics(
            uniformity=-2.1, effective_rank=33.33, dims=512, collapse_warning=warning, alignment=0.3
        ),
        linear_probe=ProbeResult(0.8, 0.95, weight_decay=1e-4, val_top1_by_weight_decay={}, epochs=50)
        if probe
        else None,
        plots=tuple(plots or ()),
    )


def _diagnostics(rank: float, warning: str | None = None, similarity: bool = True) -> Diagnostics:
    stats = SimilarityStats(
        norm=Spread(20.0, 15.0, 19.87654, 25.0),
        cosine=Spread(0.12345, -0.1, 0.1, 0.56789),
        nn_cosine=Spread(0.8, 0.6, 0.81111, 0.95),
    )
    return Diagnostics(-3.25, rank, 512, warning, 0.41234, stats if similarity else None)


def _label_free(tmp_path: Path, top_b: str = "/elsewhere/y.png") -> LabelFreeResult:
    """A complete label-free result whose plots and CSVs exist under ``tmp_path/run``."""
    run, images = tmp_path / "run", tmp_path / "images"
    plots = {
        name: str(_png(run / "plots" / f"{name}.png", seed))
        for seed, name in enumerate(
            ["training", "embeddings", "similarity", "neighbours", "random_neighbours", "duplicates", "clusters"]
        )
    }
    for csv in ("duplicates.csv", "clusters.csv"):
        (run / csv).write_text("a,b\n")
    return LabelFreeResult(
        source=str(images),
        num_images=120,
        skipped=2,
        backbones={
            "pretrained": _diagnostics(123.456),
            "random_init": _diagnostics(1.5, "the representation looks collapsed"),
        },
        duplicates=DuplicatePairs(
            threshold=0.95,
            pairs=3,
            exact=1,
            csv=str(run / "duplicates.csv"),
            top=(
                (str(images / "cats" / "a.png"), str(images / "cats" / "b.png"), 1.0, True),
                (str(images / "x.png"), top_b, 0.96789, False),
            ),
            hash_max_distance=10,
            relative_closeness=0.7,
            by_rule=(("hash", 2), ("cosine", 1), ("relative", 1)),
        ),
        clusters=ClusterSizes(3, (60, 40, 20), str(run / "clusters.csv")),
        plots=plots,
    )


def _by_title(sections: list[Section]) -> dict[str, Section]:
    return {s.title: s for s in sections}


# --- labelled ----------------------------------------------------------------------------------


def test_labelled_markdown_has_each_backbones_metrics_warning_and_relative_figures(tmp_path: Path) -> None:
    plots = [str(_png(tmp_path / "plots" / "embeddings.png", 0)), str(_png(tmp_path / "plots" / "neighbours.png", 1))]
    result = {
        "pretrained": _labelled(plots),
        "random_init": _labelled(warning="the representation looks collapsed", probe=False),
    }

    md, page = write_report(labelled_sections(result), tmp_path, "Evaluation of runs/demo")

    assert md == tmp_path / "report.md" and page == tmp_path / "report.html" and page.is_file()
    text = md.read_text()
    pretrained, random_init = text.split("## random_init")
    assert text.startswith("# Evaluation of runs/demo\n\n## pretrained\n\n| metric | value |\n| --- | --- |\n")
    for line in (
        "| kNN top-1 / top-5 (k=5, T=0.1) | 0.9123 / 0.9900 |",
        "| linear probe top-1 / top-5 (wd 0.0001) | 0.8000 / 0.9500 |",
        "| recall@1 | 0.5000 |",
        "| map@r | 0.2500 |",
        "| roc_auc | 0.7500 |",
        "| alignment (two views) | 0.3000 |",
        "| uniformity | -2.1000 |",
        "| effective rank (of 512) | 33.3 |",
        "| images train / test | 24 / 12 |",
        "![embedding map](plots/embeddings.png)",
        "![nearest neighbours](plots/neighbours.png)",
    ):
        assert line in pretrained.splitlines(), line
    assert "linear probe" not in random_init and "![" not in random_init
    assert "**Warning:** the representation looks collapsed." in random_init.splitlines()
    assert "Warning" not in pretrained
    # The HTML page is written next to it, with the same numbers.
    page = (tmp_path / "report.html").read_text()
    assert "0.9123 / 0.9900" in page and page.count('src="data:image/png;base64,') == 2


def test_labelled_sections_caption_figures_from_file_names_and_note_missing_ones(tmp_path: Path) -> None:
    training = _png(tmp_path / "plots" / "training.png", 0)
    (section,) = labelled_sections({"pretrained": _labelled([str(training), str(tmp_path / "gone" / "my_plot.png")])})

    assert section.title == "pretrained" and section.notes == ()
    assert section.figures == ((training, "training curves"), (tmp_path / "gone" / "my_plot.png", "my plot"))
    (tmp_path / "out").mkdir()
    md = write_markdown([section], tmp_path / "out" / "report.md", "t").read_text()
    assert "![training curves](../plots/training.png)" in md  # relative to the report's folder
    assert f"**Warning:** figure {tmp_path / 'gone' / 'my_plot.png'} is missing." in md
    assert "![my plot]" not in md


# --- label-free --------------------------------------------------------------------------------


def test_label_free_sections_in_order_with_formatted_numbers(tmp_path: Path) -> None:
    result = _label_free(tmp_path)
    sections = label_free_sections(result)

    assert [s.title for s in sections] == [
        "Summary",
        "Representation",
        "Training",
        "Embedding map",
        "Nearest neighbours",
        "Near-duplicates",
        "Clusters",
    ]
    s = _by_title(sections)
    assert s["Summary"].metrics == (
        ("source", str(tmp_path / "images")),
        ("images", "120"),
        ("skipped (unreadable)", "2"),
    )
    (rep,) = s["Representation"].tables
    assert rep.header == ("metric", "pretrained", "random init")
    assert rep.rows == (
        ("effective rank (RankMe)", "123.5 of 512", "1.5 of 512"),
        ("alignment (two views)", "0.4123", "0.4123"),
        ("uniformity", "-3.2500", "-3.2500"),
        ("feature norm p50", "19.8765", "19.8765"),
        ("cosine mean", "0.1235", "0.1235"),
        ("cosine p95", "0.5679", "0.5679"),
        ("nearest-neighbour cosine p50", "0.8111", "0.8111"),
    )
    assert s["Representation"].notes == (READING_GUIDE, "Warning: random init: the representation looks collapsed.")
    plots = tmp_path / "run" / "plots"
    assert s["Representation"].figures == ((plots / "similarity.png", "cosine similarity histogram"),)
    assert s["Training"].figures == ((plots / "training.png", "training curves"),)
    assert s["Nearest neighbours"].figures == (
        (plots / "neighbours.png", "nearest neighbours (pretrained)"),
        (plots / "random_neighbours.png", "nearest neighbours (random init)"),
    )

    dup = s["Near-duplicates"]
    assert dup.metrics == (
        ("pairs", "3"),
        ("by perceptual hash", "2"),
        ("by cosine >= 0.95", "1"),
        ("by standing out from neighbours", "1"),
        ("exact copies (same bytes)", "1"),
    )
    assert dup.tables == (
        Table(
            ("image A", "image B", "cosine", "exact copy"),
            (
                ("cats/a.png", "cats/b.png", "1.0000", "yes"),  # relative to the source folder
                ("x.png", "/elsewhere/y.png", "0.9679", "no"),
            ),
        ),
    )
    assert dup.notes[0] == "The 2 most similar of 3 pairs; the CSV lists them all."
    assert "within 10 of 64 bits" in dup.notes[1] and "goes 0.7 of the way" in dup.notes[1]
    assert dup.files == ((tmp_path / "run" / "duplicates.csv", "every pair found"),)

    clusters = s["Clusters"]
    assert clusters.metrics == (("k (k-means)", "3"),)
    assert clusters.tables[0].rows == (("0", "60", "50.0%"), ("1", "40", "33.3%"), ("2", "20", "16.7%"))
    assert clusters.figures == ((plots / "clusters.png", "cluster samples"),)
    assert clusters.files == ((tmp_path / "run" / "clusters.csv", "the cluster of every image"),)


def test_label_free_sections_omit_what_the_result_lacks() -> None:
    result = LabelFreeResult(
        source="user/images",
        num_images=10,
        skipped=0,
        backbones={"pretrained": _diagnostics(40.0, similarity=False)},
        duplicates=DuplicatePairs(threshold=0.9, pairs=0, exact=0, csv="", top=()),
        clusters=ClusterSizes(1, (10,), ""),
        plots={"embeddings": "plots/embeddings.png"},
    )
    sections = label_free_sections(result)

    titles = ["Summary", "Representation", "Embedding map", "Near-duplicates", "Clusters"]
    assert [s.title for s in sections] == titles
    rep = _by_title(sections)["Representation"]
    assert rep.tables[0].header == ("metric", "pretrained")  # no random-init column
    assert rep.tables[0].rows[-1] == ("nearest-neighbour cosine p50", MISSING)
    assert rep.notes == (READING_GUIDE,) and rep.figures == ()
    dup = _by_title(sections)["Near-duplicates"]
    assert dup.tables == () and dup.files == ()
    assert dup.notes == ("No pair of images was found by any rule.",)
    assert _by_title(sections)["Clusters"].files == ()


def test_label_free_markdown_tables_links_and_escaped_cells(tmp_path: Path) -> None:
    result = _label_free(tmp_path, top_b="/odd|name.png")
    md = write_markdown(label_free_sections(result), tmp_path / "run" / "report.md", "Label-free run").read_text()
    lines = md.splitlines()

    assert lines[0] == "# Label-free run"
    assert "| metric | pretrained | random init |" in lines
    assert "| effective rank (RankMe) | 123.5 of 512 | 1.5 of 512 |" in lines
    assert "**Warning:** random init: the representation looks collapsed." in lines
    assert "| x.png | /odd\\|name.png | 0.9679 | no |" in lines
    assert "![cosine similarity histogram](plots/similarity.png)" in lines
    assert "![nearest neighbours (random init)](plots/random_neighbours.png)" in lines
    assert "- [duplicates.csv](duplicates.csv): every pair found" in lines
    assert "- [clusters.csv](clusters.csv): the cluster of every image" in lines
    assert "| 2 | 20 | 16.7% |" in lines
    assert lines.index("## Summary") < lines.index("## Representation") < lines.index("## Clusters")


# --- HTML --------------------------------------------------------------------------------------


def test_html_inlines_every_figure_as_base64_of_the_same_bytes(tmp_path: Path) -> None:
    result = _label_free(tmp_path)
    page = write_html(label_free_sections(result), tmp_path / "run" / "report.html", "Label-free run").read_text()

    assert 'src="plots/' not in page and "http://" not in page and "https://" not in page
    assert "<script" not in page
    inlined = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    assert len(inlined) == len(result.plots) == 7
    by_caption = {alt: base64.b64decode(data) for data, alt in inlined}
    plots = tmp_path / "run" / "plots"
    assert by_caption["training curves"] == (plots / "training.png").read_bytes()
    assert by_caption["nearest neighbours (random init)"] == (plots / "random_neighbours.png").read_bytes()
    assert by_caption["cluster samples"] == (plots / "clusters.png").read_bytes()
    # A contents list links to each section's id; the CSVs are linked relative to the page.
    ids = re.findall(r'<section id="([^"]+)">', page)
    sections = ["summary", "representation", "training", "embedding-map", "nearest-neighbours", "near-duplicates"]
    assert ids == [*sections, "clusters"]
    assert all(f'<li><a href="#{i}">' in page for i in ids)
    assert '<a href="duplicates.csv">duplicates.csv</a>' in page
    assert '<td class="num">123.5 of 512</td>' in page


def test_html_escapes_text_and_notes_a_missing_figure(tmp_path: Path) -> None:
    sections = [
        Section(
            title="Odd <b>section</b>",
            metrics=(("a & b", "<1>"),),
            figures=((tmp_path / "missing.png", "lost plot"),),
            notes=("Warning: x < y",),
        ),
        Section(title="Odd <b>section</b>"),
    ]
    title = "run <script>alert('x')</script>"
    page = write_html(sections, tmp_path / "report.html", title).read_text()

    assert "<script>" not in page and "<b>" not in page
    assert f"<title>{'run &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;'}</title>" in page
    assert "<h1>run &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</h1>" in page
    assert "<td>a &amp; b</td>" in page and "&lt;1&gt;" in page
    assert "<img" not in page  # no broken image
    assert f"<strong>Warning:</strong> figure {tmp_path / 'missing.png'} is missing.</p>" in page
    assert "<strong>Warning:</strong> x &lt; y</p>" in page
    assert re.findall(r'<section id="([^"]+)">', page) == ["odd-b-section-b", "odd-b-section-b-2"]
