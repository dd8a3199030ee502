"""A resolved source as a map-style data set of ``(uint8 (3,S,S) image, label)`` items, for the
commands that read every image once in order (``twinview evaluate``, ``embed``, ``preview``, the
online monitor).

Image folders and file lists are read as files; Hugging Face sources and WebDataset tar shards
through ``datasets`` (shards are converted once to an Arrow copy that ``datasets`` caches, which
suits evaluation sets; training streams them instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twinview.pretrain.data.folder import ImageFolderDataset, SkipLog
from twinview.pretrain.data.source import Source

if TYPE_CHECKING:  # hf.py imports datasets, which only its sources need
    from twinview.pretrain.data.hf import HFImageDataset


def open_images(
    source: Source, image_size: int, strict: bool = False, skip_log: SkipLog | None = None
) -> ImageFolderDataset | HFImageDataset:
    """Opens a resolved folder, file list, Hugging Face source or tar shards.

    Args:
        source: From :func:`~twinview.pretrain.data.source.resolve_source`.
        image_size: Side of the returned square images.
        strict: Raise :class:`~twinview.pretrain.data.decode.BadImage` on an image that cannot be
            decoded, instead of returning the next good one in its place.
        skip_log: Where skipped images are recorded.

    Returns:
        The data set; both kinds have an ``index`` (files or ``url#key`` names, labels, classes).
    """
    if source.read_by_datasets:
        from twinview.pretrain.data.hf import HFImageDataset

        return HFImageDataset(source, image_size, strict=strict, skip_log=skip_log)
    return ImageFolderDataset(source.files, image_size, strict=strict, skip_log=skip_log)
