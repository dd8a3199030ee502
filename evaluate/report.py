"""The report of an evaluation, as Markdown and as one self-contained HTML page.

A report is a list of :class:`Section` s (metrics, tables, figures, notes and linked files), built
from an evaluation result by :func:`labelled_sections` (``twinview evaluate`` on labelled folders)
or :func:`label_free_sections` (the label-free evaluation of an unlabelled image set), and written
by :func:`write_markdown` (figures linked relative to the report) or :func:`write_html` (figures
inlined as base64 ``data:`` URLs, so the page reads offline and can be sent as one file).
:func:`write_report` writes both, as ``twinview evaluate`` does (RUN_DIR/report.md and report.html).
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from twinview.evaluate.results import (
    ClusterSizes,
    Diagnostics,
    DuplicatePairs,
    FinetuneResult,
    LabelFreeResult,
    LabelledResult,
    Leaks,
    Outliers,
    SimilarityStats,
)

MISSING = "—"  # a table cell whose value the result does not hold
WARNING_PREFIX = "Warning: "  # a note starting with it is rendered as a highlighted warning
FIGURE_CAPTIONS = {
    "embeddings": "embedding map",
    "neighbours": "nearest neighbours",
    "training": "training curves",
    "similarity": "cosine similarity histogram",
    "random_neighbours": "nearest neighbours (random init)",
    "duplicates": "near-duplicate pairs",
    "outliers": "the most unusual images",
    "clusters": "cluster samples",
}
BACKBONE_NAMES = {"pretrained": "pretrained", "random_init": "random init"}


@dataclass(frozen=True)
class Table:
    """A table of text cells; every row has as many cells as the header."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Section:
    """One part of a report, rendered in this order: metrics, tables, notes, figures, files.

    Attributes:
        title: The section's heading (and, slugged, its HTML id).
        metrics: ``(name, formatted value)`` pairs, shown as a two-column table.
        tables: Further tables.
        figures: ``(image file, caption)``; a file missing on disk is reported as a note.
        notes: Sentences; one starting with ``"Warning: "`` is highlighted.
        files: ``(file, caption)`` of outputs the report links to (e.g. ``duplicates.csv``).
    """

    title: str
    metrics: tuple[tuple[str, str], ...] = ()
    tables: tuple[Table, ...] = ()
    figures: tuple[tuple[Path, str], ...] = ()
    notes: tuple[str, ...] = ()
    files: tuple[tuple[Path, str], ...] = ()


# --- sections of a labelled evaluation ---------------------------------------------------------


def labelled_sections(result: Mapping[str, LabelledResult]) -> list[Section]:
    """One section per evaluated backbone: its metrics, a collapse warning, its plots.

    Args:
        result: Backbone name (e.g. ``pretrained``, ``random_init``) -> its result.

    Returns:
        The sections, in the result's order.
    """
    sections = []
    for name, r in result.items():
        sections.append(labelled_section(name, r))
        if r.leaks is not None:
            sections.append(leaks_section(r.leaks))
    return sections


def leaks_section(leaks: Leaks) -> Section:
    """Test images that are copies of training images, and the scores without them."""
    metrics: tuple[tuple[str, str], ...] = (
        ("test images", str(leaks.test_images)),
        ("near-duplicates of a training image", f"{leaks.leaked} ({leaks.leaked / max(1, leaks.test_images):.1%})"),
        ("byte-identical copies", str(leaks.exact)),
    )
    if leaks.leaked and leaks.knn_top1_without is not None and leaks.knn_top5_without is not None:
        metrics += (
            ("kNN top-1 without them", f"{leaks.knn_top1_without:.4f}"),
            ("kNN top-5 without them", f"{leaks.knn_top5_without:.4f}"),
        )
        if leaks.probe_top1_without is not None:
            metrics += (("linear probe top-1 without them", f"{leaks.probe_top1_without:.4f}"),)
    notes: tuple[str, ...] = (
        f"A test image leaks when its nearest training image has cosine >= {leaks.threshold:g}"
        + (
            f", or when their perceptual hashes (of the image and its mirror) are within {leaks.hash_max_distance} "
            "of 64 bits"
            if leaks.hash_max_distance >= 0
            else ""
        )
        + ". A score on a test set that shares images with the training set is inflated.",
    )
    if leaks.warning:
        notes += (f"{WARNING_PREFIX}{leaks.warning}.",)
    return Section(
        title="Leaks between train and test",
        metrics=metrics,
        notes=notes,
        files=((Path(leaks.csv), "every leaked test image and its training image"),) if leaks.csv else (),
    )


def labelled_section(name: str, r: LabelledResult) -> Section:
    """The section of one backbone of a labelled evaluation (see :func:`labelled_sections`)."""
    warning = r.diagnostics.collapse_warning
    return Section(
        title=name,
        metrics=labelled_metrics(r),
        notes=(f"{WARNING_PREFIX}{warning}.",) if warning else (),
        figures=tuple((Path(p), figure_caption(Path(p))) for p in r.plots),
    )


def labelled_metrics(r: LabelledResult) -> tuple[tuple[str, str], ...]:
    """kNN, linear probe, retrieval, verification and diagnostics of one backbone, formatted."""
    knn = r.knn
    metrics = [(f"kNN top-1 / top-5 (k={knn.k}, T={knn.temperature})", f"{knn.top1:.4f} / {knn.top5:.4f}")]
    if r.linear_probe is not None:
        p = r.linear_probe
        metrics.append((f"linear probe top-1 / top-5 (wd {p.weight_decay:g})", f"{p.top1:.4f} / {p.top5:.4f}"))
    metrics += [(k, f"{v:.4f}") for k, v in r.retrieval.items()]
    metrics += [(k, f"{v:.4f}") for k, v in r.verification.items()]
    d = r.diagnostics
    metrics += [
        ("alignment (two views)", f"{d.alignment:.4f}"),
        ("uniformity", f"{d.uniformity:.4f}"),
        (f"effective rank (of {d.dims})", f"{d.effective_rank:.1f}"),
        ("images train / test", f"{knn.num_reference} / {knn.num_query}"),
    ]
    return tuple(metrics)


def figure_caption(png: Path) -> str:
    """The caption of a plot, from its file name (``embeddings.png`` -> ``embedding map``)."""
    return FIGURE_CAPTIONS.get(png.stem, png.stem.replace("_", " "))


# --- sections of a label-free evaluation -------------------------------------------------------


def label_free_sections(result: LabelFreeResult) -> list[Section]:
    """The sections of a label-free evaluation.

    Returns:
        Summary, Representation, Training, Embedding map, Nearest neighbours, Near-duplicates,
        Outliers, Clusters and Explorer, those that have data, in this order.
    """
    plots = {name: Path(p) for name, p in result.plots.items()}
    candidates = [
        summary_section(result),
        representation_section(result.backbones, plots),
        figure_section("Training", plots, ["training"]),
        figure_section("Embedding map", plots, ["embeddings"]),
        figure_section("Nearest neighbours", plots, ["neighbours", "random_neighbours"]),
        duplicates_section(result.duplicates, result.source, plots),
        outliers_section(result.outliers, result.source, plots) if result.outliers is not None else None,
        clusters_section(result.clusters, plots),
        explorer_section(result) if result.explorer else None,
    ]
    return [s for s in candidates if s is not None]


def explorer_section(result: LabelFreeResult) -> Section:
    """Where the explorer page is and what it shows."""
    return Section(
        title="Explorer",
        notes=(
            f"Every image as a point of a 2-D map of the embeddings ({result.map_method}), coloured by cluster: "
            "hover for the thumbnail, click for the image's nearest neighbours (as twinview search ranks them; from "
            "100,000 images, faiss's approximate graph), "
            "its cluster and flags; filter by cluster, near-duplicates and outliers. Open the page in a browser; "
            "it needs no network.",
        ),
        files=((Path(result.explorer), "explorer"),),
    )


def summary_section(result: LabelFreeResult) -> Section:
    """The source of the images, how many were embedded and how many could not be read."""
    return Section(
        title="Summary",
        metrics=(
            ("source", result.source),
            ("images", str(result.num_images)),
            ("skipped (unreadable)", str(result.skipped)),
        ),
        files=((Path(result.skipped_list), "the images that could not be decoded, with the reason"),)
        if result.skipped_list
        else (),
    )


# (row name, how to read and format it from a backbone's diagnostics)
REPRESENTATION_ROWS: tuple[tuple[str, Callable[[Diagnostics], str]], ...] = (
    ("effective rank (RankMe)", lambda d: f"{d.effective_rank:.1f} of {d.dims}"),
    ("alignment (two views)", lambda d: f"{d.alignment:.4f}"),
    ("uniformity", lambda d: f"{d.uniformity:.4f}"),
    ("feature norm p50", lambda d: f"{_similarity(d).norm.p50:.4f}"),
    ("cosine mean", lambda d: f"{_similarity(d).cosine.mean:.4f}"),
    ("cosine p95", lambda d: f"{_similarity(d).cosine.p95:.4f}"),
    ("nearest-neighbour cosine p50", lambda d: f"{_similarity(d).nn_cosine.p50:.4f}"),
)


def _similarity(d: Diagnostics) -> SimilarityStats:
    if d.similarity is None:
        raise LookupError("no similarity statistics")
    return d.similarity


READING_GUIDE = (
    "How to read it: a useful representation has a high effective rank (RankMe: how many dimensions "
    "the images spread over) and a low uniformity (spread over the sphere), with pairwise and "
    "nearest-neighbour cosines well below 1. Alignment (distance between two views of an image) is "
    "lower-is-better only next to those: a random-init backbone maps every image to nearly the same "
    "vector, so its views align trivially."
)


def representation_section(backbones: Mapping[str, Diagnostics], plots: Mapping[str, Path]) -> Section | None:
    """The pretrained backbone's representation statistics beside the random-init baseline's.

    Returns:
        None when there are no ``pretrained`` diagnostics.
    """
    names = [name for name in BACKBONE_NAMES if name in backbones]
    if "pretrained" not in names:
        return None
    diagnostics = [backbones[name] for name in names]
    table = Table(
        header=("metric", *(BACKBONE_NAMES[name] for name in names)),
        rows=tuple((row, *(_format_or_missing(fmt, d) for d in diagnostics)) for row, fmt in REPRESENTATION_ROWS),
    )
    warnings = tuple(
        f"{WARNING_PREFIX}{BACKBONE_NAMES[name]}: {d.collapse_warning}."
        for name, d in zip(names, diagnostics, strict=True)
        if d.collapse_warning
    )
    notes = (READING_GUIDE, *warnings)
    return Section(title="Representation", tables=(table,), notes=notes, figures=_figures(plots, ["similarity"]))


def _format_or_missing(fmt: Callable[[Diagnostics], str], diagnostics: Diagnostics) -> str:
    """``fmt(diagnostics)``, or :data:`MISSING` when a value it reads is absent."""
    try:
        return fmt(diagnostics)
    except LookupError:
        return MISSING


def figure_section(title: str, plots: Mapping[str, Path], names: Sequence[str]) -> Section | None:
    """A section of the named plots that are present, or None when none is."""
    figures = _figures(plots, names)
    return Section(title=title, figures=figures) if figures else None


def _figures(plots: Mapping[str, Path], names: Iterable[str]) -> tuple[tuple[Path, str], ...]:
    """``(path, caption)`` of the named plots present in ``plots``, in the order of ``names``."""
    captions = {**FIGURE_CAPTIONS, "neighbours": "nearest neighbours (pretrained)"}
    return tuple((plots[name], captions[name]) for name in names if name in plots)


def duplicates_section(dup: DuplicatePairs, source: str, plots: Mapping[str, Path]) -> Section:
    """Near-duplicate pairs: the threshold, the counts, the closest pairs, their grid and the CSV."""
    rows = tuple(
        (_short_path(a, source), _short_path(b, source), f"{float(sim):.4f}", "yes" if exact else "no")
        for a, b, sim, exact in dup.top
    )
    if dup.pairs == 0:
        notes: tuple[str, ...] = ("No pair of images was found by any rule.",)
    elif dup.pairs > len(dup.top):
        notes = (f"The {len(dup.top)} most similar of {dup.pairs} pairs; the CSV lists them all.",)
    else:
        notes = ()
    if dup.mirror_invariant:
        notes += (
            "Similarities here compare each image's embedding plus its mirror image's, so a mirrored copy "
            "scores like an exact one; they are not the cosines of the neighbour grids or of twinview search.",
        )
    if dup.warning:
        notes += (f"{WARNING_PREFIX}{dup.warning}.",)
    rules = dict(dup.by_rule)
    relative = str(rules.get("relative", 0)) if dup.relative_closeness > 0 else "not used"
    found_by = [f"embeddings at or above the cosine threshold ({dup.threshold:g})"]
    if dup.relative_closeness > 0:
        found_by.append(
            f"mutual nearest neighbours whose cosine goes {dup.relative_closeness:g} of the way from both images' "
            "typical neighbour cosine to 1 (which depends far less on how long the model trained)"
        )
    if dup.hash_max_distance >= 0:
        found_by.append(
            f"perceptual hashes (pHash of the image and of its mirror) within {dup.hash_max_distance} of 64 "
            "bits (which do not depend on the model at all)"
        )
    if len(found_by) > 1:
        notes += ("A pair is found by any of these rules (the CSV's rule column): " + "; ".join(found_by) + ".",)
    return Section(
        title="Near-duplicates",
        metrics=(
            ("pairs", str(dup.pairs)),
            ("by perceptual hash", str(rules.get("hash", 0)) if dup.hash_max_distance >= 0 else "not hashed"),
            (f"by cosine >= {dup.threshold:g}", str(rules.get("cosine", dup.pairs))),
            (
                "by standing out from neighbours",
                relative,
            ),
            ("exact copies (same bytes)", str(dup.exact)),
        ),
        tables=(Table(("image A", "image B", "cosine", "exact copy"), rows),) if rows else (),
        notes=notes,
        figures=_figures(plots, ["duplicates"]),
        files=((Path(dup.csv), "every pair found"),) if dup.csv else (),
    )


def outliers_section(out: Outliers, source: str, plots: Mapping[str, Path]) -> Section:
    """The most unusual images, the flags and the CSV that ranks them all."""
    rows = tuple((_short_path(name, source), f"{score:.4f}", flags or "-") for name, score, flags in out.top)
    return Section(
        title="Outliers",
        metrics=(
            ("uniqueness", f"1 - cosine to the {out.k}th nearest other image"),
            ("near-constant images (blank, one colour)", str(out.near_constant)),
            ("tiny files", str(out.tiny)),
        ),
        tables=(Table(("image", "uniqueness", "flags"), rows),) if rows else (),
        notes=(
            "The images that look like nothing else in the set come first: mislabelled, corrupt-looking or "
            "off-topic images are among them, and are what to review first.",
        ),
        figures=_figures(plots, ["outliers"]),
        files=((Path(out.csv), "every image, most unusual first, with its flags"),) if out.csv else (),
    )


def _short_path(path: str, source: str) -> str:
    """``path`` relative to the ``source`` folder when it lies inside it, else as given."""
    try:
        return Path(path).relative_to(source).as_posix() if source else path
    except ValueError:
        return path


def clusters_section(clusters: ClusterSizes, plots: Mapping[str, Path]) -> Section:
    """k-means clusters: k, each cluster's size and share of the images, their grid and the CSV."""
    total = sum(clusters.sizes) or 1
    return Section(
        title="Clusters",
        metrics=(("k (k-means)", str(clusters.k)),),
        tables=(
            Table(
                ("cluster", "images", "share"),
                tuple((str(i), str(size), f"{100 * size / total:.1f}%") for i, size in enumerate(clusters.sizes)),
            ),
        ),
        figures=_figures(plots, ["clusters"]),
        files=((Path(clusters.csv), "the cluster of every image"),) if clusters.csv else (),
    )


# --- Markdown ----------------------------------------------------------------------------------


def write_markdown(sections: Sequence[Section], path: Path, title: str) -> Path:
    """Writes the report as Markdown; figures and files are linked relative to ``path``.

    Args:
        sections: The report's sections.
        path: The Markdown file to write (its folder must exist).
        title: The report's heading.

    Returns:
        ``path``.
    """
    path = Path(path)
    lines = [f"# {title}", ""]
    for section in sections:
        lines += markdown_section(section, path.parent)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def markdown_section(section: Section, base: Path) -> list[str]:
    """The Markdown lines of one section, each block followed by a blank line."""
    lines = [f"## {section.title}", ""]
    if section.metrics:
        lines += [*_markdown_table(Table(("metric", "value"), section.metrics)), ""]
    for table in section.tables:
        lines += [*_markdown_table(table), ""]
    notes = list(section.notes) + [_missing_note(p, "figure") for p, _ in section.figures if not p.is_file()]
    for note in notes:
        lines += [_markdown_note(note), ""]
    for png, caption in section.figures:
        if png.is_file():
            lines += [f"![{_markdown_text(caption)}]({_relative_link(png, base)})", ""]
    for file, caption in section.files:
        lines.append(f"- [{_markdown_text(file.name)}]({_relative_link(file, base)}): {caption}")
    return [*lines, ""] if section.files else lines


def _markdown_table(table: Table) -> list[str]:
    """A pipe table; ``|`` in a cell is escaped and newlines become spaces."""

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [row(table.header), row(["---"] * len(table.header)), *(row(r) for r in table.rows)]


def _markdown_note(note: str) -> str:
    """A note as a paragraph, with a leading ``Warning:`` in bold."""
    if note.startswith(WARNING_PREFIX):
        return f"**Warning:** {note[len(WARNING_PREFIX) :]}"
    return note


def _markdown_text(text: str) -> str:
    """Text safe inside ``[...]`` of a Markdown link or image."""
    return text.replace("[", "\\[").replace("]", "\\]")


def _relative_link(file: Path, base: Path) -> str:
    """``file`` relative to the folder ``base``, as a URL path (``/`` separators, percent-encoded)."""
    return quote(Path(os.path.relpath(file.resolve(), base.resolve())).as_posix())


def _missing_note(file: Path, kind: str) -> str:
    """The note that replaces a figure or file missing on disk."""
    return f"{WARNING_PREFIX}{kind} {file} is missing."


# --- HTML --------------------------------------------------------------------------------------

CSS = """
:root { color-scheme: light dark; --fg: #1d2430; --muted: #5b6675; --bg: #ffffff; --panel: #f5f7fa;
  --line: #dde3ea; --accent: #2f6fb3; --warn-bg: #fff4e0; --warn-line: #e0a030; }
@media (prefers-color-scheme: dark) { :root { --fg: #e4e8ee; --muted: #a3adba; --bg: #14181e;
  --panel: #1d232b; --line: #323b46; --accent: #7fb2ec; --warn-bg: #3a2e16; --warn-line: #c8902a; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.6em; overflow-wrap: anywhere; }
h2 { font-size: 1.3em; margin: 1.8em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid var(--line); }
nav.toc { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 18px; }
nav.toc h2 { border: none; margin: 0.2em 0; font-size: 1em; color: var(--muted); }
nav.toc ol { margin: 0.3em 0; padding-left: 1.4em; columns: 2; }
a { color: var(--accent); }
.scroll { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--panel); }
td.num { text-align: right; white-space: nowrap; }
td { overflow-wrap: anywhere; }
p.note { background: var(--panel); border-left: 4px solid var(--line); padding: 6px 12px; }
p.warning { background: var(--warn-bg); border-left-color: var(--warn-line); }
figure { margin: 1em 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.92em; margin-top: 4px; }
ul.files { padding-left: 1.4em; }
"""
NUMBER = re.compile(r"^[-+]?[\d.,]+(?:e[-+]?\d+)?%?(?: (?:/|of) [-+]?[\d.,]+)?$")


def write_html(sections: Sequence[Section], path: Path, title: str) -> Path:
    """Writes the report as one self-contained HTML page.

    The CSS is inline and every figure is embedded as a base64 ``data:`` URL, so the page needs
    nothing else to be read offline (linked files, such as CSVs, are relative links); there is no
    JavaScript. A figure missing on disk becomes a warning note instead of a broken image.

    Args:
        sections: The report's sections.
        path: The HTML file to write (its folder must exist).
        title: The page's ``<title>`` and ``<h1>``.

    Returns:
        ``path``.
    """
    path = Path(path)
    ids = section_ids(sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_esc(title)}</h1>",
        html_toc(sections, ids),
        *(html_section(section, id_, path.parent) for section, id_ in zip(sections, ids, strict=True)),
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def section_ids(sections: Sequence[Section]) -> list[str]:
    """A unique HTML id per section, slugged from its title (``Near-duplicates`` -> ``near-duplicates``)."""
    ids: list[str] = []
    for section in sections:
        slug = re.sub(r"[^a-z0-9]+", "-", section.title.lower()).strip("-") or "section"
        candidate, n = slug, 2
        while candidate in ids:
            candidate, n = f"{slug}-{n}", n + 1
        ids.append(candidate)
    return ids


def html_toc(sections: Sequence[Section], ids: Sequence[str]) -> str:
    """The table of contents: a link to each section."""
    items = "".join(f'<li><a href="#{id_}">{_esc(s.title)}</a></li>' for s, id_ in zip(sections, ids, strict=True))
    return f'<nav class="toc"><h2>Contents</h2><ol>{items}</ol></nav>'


def html_section(section: Section, id_: str, base: Path) -> str:
    """One ``<section>``: heading, metrics, tables, notes, figures (inlined) and file links."""
    parts = [f'<section id="{id_}">', f"<h2>{_esc(section.title)}</h2>"]
    if section.metrics:
        parts.append(html_table(Table(("metric", "value"), section.metrics)))
    parts += [html_table(t) for t in section.tables]
    notes = list(section.notes) + [_missing_note(p, "figure") for p, _ in section.figures if not p.is_file()]
    parts += [html_note(n) for n in notes]
    parts += [html_figure(png, caption) for png, caption in section.figures if png.is_file()]
    if section.files:
        items = "".join(
            f'<li><a href="{_esc(_relative_link(f, base))}">{_esc(f.name)}</a>: {_esc(caption)}</li>'
            for f, caption in section.files
        )
        parts.append(f'<ul class="files">{items}</ul>')
    parts.append("</section>")
    return "\n".join(parts)


def html_table(table: Table) -> str:
    """A ``<table>`` in a horizontally scrolling box; numeric cells are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(_html_cell(c, first=i == 0) for i, c in enumerate(row)) + "</tr>" for row in table.rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_cell(text: str, first: bool) -> str:
    """A ``<td>``, of class ``num`` when it holds a number (never the row's name in column 0)."""
    numeric = not first and NUMBER.match(text) is not None
    return f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>"


def html_note(note: str) -> str:
    """A note paragraph; a warning is highlighted, with its ``Warning:`` in bold."""
    if note.startswith(WARNING_PREFIX):
        return f'<p class="note warning"><strong>Warning:</strong> {_esc(note[len(WARNING_PREFIX) :])}</p>'
    return f'<p class="note">{_esc(note)}</p>'


def html_figure(image: Path, caption: str) -> str:
    """A ``<figure>`` whose image is inlined as a base64 ``data:`` URL."""
    return (
        f'<figure><img src="{data_url(image)}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'
    )


def data_url(image: Path) -> str:
    """The file as a ``data:`` URL (its type from its suffix; PNG when unknown)."""
    mime = mimetypes.guess_type(image.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode('ascii')}"


def _esc(text: str) -> str:
    """HTML-escaped text, quotes included (safe in element content and attribute values)."""
    return html.escape(str(text), quote=True)


# --- what `twinview evaluate` writes -----------------------------------------------------------


def write_report(sections: Sequence[Section], folder: Path, title: str) -> tuple[Path, Path]:
    """Writes ``folder/report.md`` and ``folder/report.html`` from the same sections.

    Args:
        sections: From :func:`labelled_sections` and/or :func:`label_free_sections`.
        folder: The run directory (or ``--out``); figures are linked relative to it.
        title: The report's heading.

    Returns:
        The Markdown and HTML files.
    """
    folder = Path(folder)
    return write_markdown(sections, folder / "report.md", title), write_html(sections, folder / "report.html", title)


# --- the section of twinview finetune ----------------------------------------------------------


def finetune_section(result: FinetuneResult, plot: Path | None, files: Sequence[tuple[Path, str]] = ()) -> Section:
    """Label efficiency: per budget, test top-1 / top-5 fine-tuned from the pretrained backbone,
    from scratch and by the linear probe, with the gain over scratch."""

    def score(top1: float | None, top5: float | None) -> str:
        return MISSING if top1 is None or top5 is None else f"{top1:.4f} / {top5:.4f}"

    rows = []
    for b in result.budgets:
        s, p = b.scratch, b.probe
        gain = (
            MISSING
            if s is None
            else f"{100 * (b.pretrained.top1 - s.top1):+.1f} pts ({b.pretrained.top1 / max(s.top1, 1e-9):.2f}x)"
        )
        rows.append(
            (
                b.labels,
                str(b.images),
                score(b.pretrained.top1, b.pretrained.top5),
                score(s.top1 if s else None, s.top5 if s else None),
                score(p.top1 if p else None, p.top5 if p else None),
                gain,
                f"{b.pretrained.epochs} / {b.pretrained.steps}",
            )
        )
    table = Table(
        (
            "labels",
            "images",
            "pretrained top-1 / top-5",
            "scratch",
            "linear probe",
            "pretrained - scratch",
            "epochs / steps",
        ),
        tuple(rows),
    )
    recipe = ", ".join(f"{k} {v}" for k, v in result.settings.items())
    notes = [
        f"{result.backbone} from {result.model}; {result.train_images} labelled training images, "
        f"{result.test_images} test images, {result.classes} classes. The same recipe for every row and both "
        f"inits: {recipe}."
    ]
    if result.exported:
        notes.append(f"The pretrained fine-tune with {result.exported_labels} labels is exported to {result.exported}.")
    return Section(
        title="does pretraining pay? (fine-tuning with few labels)",
        tables=(table,),
        notes=tuple(notes),
        figures=((plot, "label efficiency"),) if plot is not None else (),
        files=tuple(files),
    )
