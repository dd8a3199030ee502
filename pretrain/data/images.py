"""Any ``data.path`` as a map-style data set of ``(uint8 (3,S,S) image, label)`` items, for the
commands that read every image once in order (``twinview evaluate``, the online monitor).

Image folders and file lists are read as files; Hugging Face sources and WebDataset tar shards
through ``datasets`` (shards are converted once to an Arrow copy that ``datasets`` caches, which
suits evaluation sets; training streams them instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twinview.pretrain.data.source_kind import is_hf_source
from twinview.pretrain.data.sources import ImageFolderDataset

if TYPE_CHECKING:  # hf.py imports datasets, which only its sources need
    from twinview.pretrain.data.hf import HFImageDataset


def open_images(
    path: str, image_size: int, split: str = "train", strict: bool = False
) -> ImageFolderDataset | HFImageDataset:
    """Opens a folder, file list, Hugging Face source or tar shards.

    Args:
        path: Anything ``data.path`` accepts.
        image_size: Side of the returned square images.
        split: Split of a Hugging Face source.
        strict: Raise :class:`~twinview.pretrain.data.decode.BadImage` on an image that cannot be
            decoded, instead of returning the next good one in its place.

    Returns:
        The data set; both kinds have an ``index`` (files or ``url#key`` names, labels, classes).
    """
    if is_hf_source(path):
        from twinview.pretrain.data.hf import HFImageDataset

        return HFImageDataset(path, image_size, split, strict=strict)
    return ImageFolderDataset(path, image_size, strict=strict)
