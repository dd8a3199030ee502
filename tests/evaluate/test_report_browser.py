"""report.html in a real headless browser (Debian's chromium): the DOM holds the run name and every
section, a screenshot shows a drawn page, and loading it logs no console error, uncaught exception or
failed resource, while pages with exactly those faults are caught by the same check.

They need Debian's chromium, which .ci/run installs; without it they skip, saying why.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import load_page, run_chromium
from twinview.evaluate.report import label_free_sections, write_html
from twinview.evaluate.results import (
    ClusterSizes,
    Diagnostics,
    DuplicatePairs,
    LabelFreeResult,
    SimilarityStats,
    Spread,
)

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

RUN_NAME = "runs/label-free <demo> & co"
# matplotlib's C1, C2, C3: the colours of the embeddings, similarity and neighbours histograms (seeds 1-3)
HISTOGRAM_COLOURS = {"embeddings": (255, 127, 14), "similarity": (44, 160, 44), "neighbours": (214, 39, 40)}
PLOT_NAMES = ("training", "embeddings", "similarity", "neighbours", "random_neighbours", "duplicates", "clusters")


# --- the report under test ---------------------------------------------------------------------


def _figure(name: str, out: Path, seed: int) -> Path:
    """A small matplotlib figure with filled, coloured areas (so a rendered page is not blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.hist(rng.normal(size=400), bins=20, color=f"C{seed % 10}")
    ax.set_title(name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _diagnostics(rank: float, warning: str | None) -> Diagnostics:
    stats = Spread(mean=0.2, p5=0.0, p50=0.2, p95=0.6)
    similarity = SimilarityStats(norm=Spread(20.0, 15.0, 19.5, 25.0), cosine=stats, nn_cosine=stats)
    return Diagnostics(-3.1, rank, 512, warning, 0.42, similarity)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a complete label-free result, its plots drawn by matplotlib."""
    run = tmp_path_factory.mktemp("run")
    images = run / "images"
    plots = {name: str(_figure(name, run / "plots" / f"{name}.png", seed)) for seed, name in enumerate(PLOT_NAMES)}
    for csv in ("duplicates.csv", "clusters.csv"):
        (run / csv).write_text("a,b\n")
    result = LabelFreeResult(
        source=str(images),
        num_images=240,
        skipped=1,
        backbones={
            "pretrained": _diagnostics(97.3, None),
            "random_init": _diagnostics(1.2, "the representation looks collapsed"),
        },
        duplicates=DuplicatePairs(
            0.95, 2, 1, str(run / "duplicates.csv"), ((str(images / "a.png"), str(images / "b.png"), 1.0, True),)
        ),
        clusters=ClusterSizes(4, (100, 70, 50, 20), str(run / "clusters.csv")),
        plots=plots,
    )
    sections = label_free_sections(result)
    assert len(sections) == 7
    return write_html(sections, run / "report.html", RUN_NAME)


class _Headings(HTMLParser):
    """The text of ``<title>``, ``<h1>`` and ``<h2>`` elements, and the ``src`` of images."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, list[str]] = {"title": [], "h1": [], "h2": []}
        self.image_sources: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.texts:
            self._open = tag
            self.texts[tag].append("")
        elif tag == "img":
            self.image_sources.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.texts[self._open][-1] += data


# --- the tests ---------------------------------------------------------------------------------


def test_dom_has_the_run_name_and_every_section(chromium: str, report: Path, tmp_path: Path) -> None:
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", report.as_uri()).stdout
    parsed = _Headings()
    parsed.feed(dom)

    assert parsed.texts["title"] == [RUN_NAME] and parsed.texts["h1"] == [RUN_NAME]
    sections = [
        "Summary",
        "Representation",
        "Training",
        "Embedding map",
        "Nearest neighbours",
        "Near-duplicates",
        "Clusters",
    ]
    assert parsed.texts["h2"] == ["Contents", *sections]
    assert len(parsed.image_sources) == len(PLOT_NAMES)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.image_sources)


def test_screenshot_shows_a_drawn_page(chromium: str, report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)

    assert pixels.shape == (3000, 1200, 3)
    grey = pixels.mean(axis=2)
    assert grey.std() > 20 and (grey < 250).mean() > 0.05  # text and figures, not a blank page
    # The first figures' histograms are drawn: each fills ~12,000 px of its matplotlib colour, which
    # nothing else on the page uses (C0 blue is left out: it is close to the links' colour).
    for name, colour in HISTOGRAM_COLOURS.items():
        assert (np.abs(pixels - np.array(colour)).max(axis=2) <= 12).sum() > 5000, name


def test_report_loads_without_console_errors(chromium: str, report: Path, tmp_path: Path) -> None:
    load = load_page(chromium, tmp_path / "profile", report)

    assert load.problems == []
    assert len(load.image_widths) == len(PLOT_NAMES) and all(w == 320 for w in load.image_widths)  # 4 in x 80 dpi


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<img src="missing.png" alt="gone">', "Failed to load resource: net::ERR_FILE_NOT_FOUND"),
        ("<script>throw new Error('deliberate')</script>", "Uncaught Error: deliberate"),
        ("<script>console.error('deliberate')</script>", "console.error: deliberate"),
    ],
)
def test_the_console_check_catches_a_broken_page(chromium: str, tmp_path: Path, body: str, expected: str) -> None:
    page = tmp_path / "broken.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>{body}</body>')

    problems = load_page(chromium, tmp_path / "profile", page).problems

    assert len(problems) == 1 and problems[0].startswith(expected), problems
