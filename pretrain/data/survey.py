"""What a run's data looks like before any compute, and ``data.image_size=auto`` chosen from it.

A survey counts the images and classes and reads the size of a fixed sample of them (image headers
only, no decoding), so the start of a run can say what it found, pick an image size when asked
to, and warn about settings that do not suit the data.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

SAMPLE = 200  # images whose size is read
AUTO_MIN, AUTO_MAX, AUTO_STEP = 32, 224, 32  # data.image_size=auto: within these, a multiple of this


@dataclass(frozen=True)
class DataSurvey:
    """The data a run found.

    Attributes:
        source: ``data.path``.
        images: Number of images; None for a stream (not counted).
        classes: Number of class labels (0: unlabeled, or a stream, whose classes are not counted).
        shorter_sides: Shorter side in pixels of each sampled image.
        label_column: A streamed source's label column, when it has one.
    """

    source: str
    images: int | None
    classes: int
    shorter_sides: tuple[int, ...]
    label_column: str = ""

    @property
    def median_side(self) -> float:
        """Median shorter side of the sample (0 when nothing was sampled)."""
        return float(statistics.median(self.shorter_sides)) if self.shorter_sides else 0.0

    def describe(self) -> str:
        """One line: count, classes and the sampled size range."""
        count = "a stream of images" if self.images is None else f"{self.images:,} images"
        if self.classes:
            classes = f", {self.classes} classes"
        else:
            classes = f", labels in '{self.label_column}'" if self.label_column else ", unlabeled"
        if not self.shorter_sides:
            return f"{count}{classes}"
        lo, hi = min(self.shorter_sides), max(self.shorter_sides)
        return (
            f"{count}{classes}; shorter side {lo}-{hi} px, median {self.median_side:.0f} "
            f"(sample of {len(self.shorter_sides)})"
        )


def survey_files(source: str, index: Any) -> DataSurvey:
    """Counts a folder's or file list's images and classes and reads the size of up to
    :data:`SAMPLE` of them, evenly spaced (headers only).

    Args:
        source: The path, for messages.
        index: Its :class:`~twinview.pretrain.data.source.FolderIndex`.
    """
    step = max(1, len(index.files) // SAMPLE)
    sides = []
    for f in index.files[::step][:SAMPLE]:
        try:
            with Image.open(f) as img:  # the header only
                sides.append(min(img.size))
        except Exception:  # a bad file: the loader lists it
            continue
    return DataSurvey(source, len(index.files), len(index.classes), tuple(sides))


def survey_rows(source: str, table: Any, image: str, label: str | None) -> DataSurvey:
    """The same for a ``datasets`` data set whose image column is undecoded: a map-style one is
    counted and sampled evenly; a streamed one is not counted, and only its first rows are read.

    Args:
        source: The path, for messages.
        table: The ``datasets.Dataset`` or ``datasets.IterableDataset``.
        image: Its image column (``Image(decode=False)``: path/bytes cells).
        label: Its label column, or None.
    """
    import datasets

    if isinstance(table, datasets.Dataset):
        step = max(1, len(table) // SAMPLE)
        rows = table.select(range(0, len(table), step)[:SAMPLE])
        images: int | None = len(table)
        classes = len(set(table[label])) if label else 0
    else:
        rows, images, classes = table.take(SAMPLE), None, 0
    sides = []
    try:
        for row in rows:
            try:
                with Image.open(_bytes_or_path(row[image])) as img:
                    sides.append(min(img.size))
            except Exception:  # a bad image: the loader lists it
                continue
    except Exception:  # a stream that fails to read further: the sample is what was read
        pass
    return DataSurvey(source, images, classes, tuple(sides), label_column=(label or "") if images is None else "")


def _bytes_or_path(cell: dict[str, Any]) -> io.BytesIO | Path:
    return io.BytesIO(cell["bytes"]) if cell.get("bytes") else Path(cell["path"])


def auto_image_size(found: DataSurvey) -> tuple[int, str]:
    """``data.image_size=auto``: the sample's median shorter side, rounded down to a multiple of
    :data:`AUTO_STEP` (no upscaling) and clamped to ``AUTO_MIN..AUTO_MAX``.

    Returns:
        The size and a sentence saying why.
    """
    if not found.shorter_sides:
        return AUTO_MAX, f"no image size could be read from '{found.source}'; {AUTO_MAX} px"
    median = found.median_side
    size = min(AUTO_MAX, max(AUTO_MIN, int(median) // AUTO_STEP * AUTO_STEP))
    why = f"the median shorter side of {len(found.shorter_sides)} sampled images is {median:.0f} px"
    if size == AUTO_MAX and median > AUTO_MAX:
        why += f"; capped at {AUTO_MAX} px, the papers' ImageNet size"
    elif size == AUTO_MIN and median < AUTO_MIN:
        why += f"; raised to the minimum of {AUTO_MIN} px"
    else:
        why += f", rounded down to a multiple of {AUTO_STEP}"
    return size, why
