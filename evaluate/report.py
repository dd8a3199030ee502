"""The Markdown report of an evaluation (what ``twinview evaluate`` writes as RUN_DIR/report.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(result: dict[str, Any], path: Path, title: str) -> Path:
    """Writes one metric table per evaluated backbone, with a warning when its representation collapsed.

    Args:
        result: Backbone name (e.g. ``pretrained``, ``random_init``) -> what
            :func:`twinview.evaluate.run.evaluate` returned for it.
        path: The Markdown file to write.
        title: The report's heading.

    Returns:
        ``path``.
    """
    lines = [f"# {title}", ""]
    for name, r in result.items():
        lines += [
            f"## {name}",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| kNN top-1 / top-5 (k={r['k']}, T={r['temperature']}) | {r['knn_top1']:.4f} / {r['knn_top5']:.4f} |",
        ]
        if "linear_probe" in r:
            p = r["linear_probe"]
            lines.append(
                f"| linear probe top-1 / top-5 (wd {p['weight_decay']:g}) "
                f"| {p['probe_top1']:.4f} / {p['probe_top5']:.4f} |"
            )
        lines += [f"| {k} | {v:.4f} |" for k, v in r["retrieval"].items()]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["verification"].items()]
        d = r["diagnostics"]
        lines += [
            f"| alignment (two views) | {d['alignment']:.4f} |",
            f"| uniformity | {d['uniformity']:.4f} |",
            f"| effective rank (of {d['dims']}) | {d['effective_rank']:.1f} |",
            f"| images train / test | {r['num_train']} / {r['num_test']} |",
            "",
        ]
        if d["collapse_warning"]:
            lines += [f"**Warning:** {d['collapse_warning']}.", ""]
    path.write_text("\n".join(lines))
    return path
