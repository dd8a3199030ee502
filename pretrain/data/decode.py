"""Decoding one image file to a square uint8 RGB array, with a reason for every file that fails.

Real folders hold broken files: truncated or zero-byte JPEGs, text saved as ``.png``, decompression
bombs, unreadable files, broken symlinks. :func:`decode_image` turns each into :class:`BadImage`
with a one-line reason, so a data set can skip it, count it and list it instead of crashing. Images
that are merely unusual are converted: EXIF orientation is applied; CMYK, palette, grayscale and
16-bit images become 8-bit RGB; transparent images are composited onto white.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(Exception):
    """A file that cannot be used as an image; ``str(err)`` is the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit scaled, alpha composited onto white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def square_rgb(img: Image.Image, size: int) -> np.ndarray:
    """A decoded image, upright (EXIF), as 8-bit RGB, shorter side resized to ``size`` and centre-cropped.

    Returns:
        A ``(size, size, 3)`` uint8 array.
    """
    img = _to_rgb(ImageOps.exif_transpose(img))
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decodes, orients and converts an image, resizes its shorter side to ``size`` and centre-crops.

    Args:
        path: The image file.
        size: Output side in pixels.

    Returns:
        A ``(size, size, 3)`` uint8 array.

    Raises:
        BadImage: With the reason when the file cannot be used.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImage("broken symbolic link" if os.path.islink(path) else "file not found") from None
    except OSError as err:
        raise BadImage("symbolic link loop" if err.errno == errno.ELOOP else f"cannot stat: {err}") from None
    try:
        if st.st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over PIL's pixel limit
            with Image.open(path) as img:
                img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
                img.load()  # decode fully now, so truncation shows here
                return square_rgb(img, size)
    except BadImage:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImage(f"decompression bomb refused: {err}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (or a format PIL cannot read)") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as err:
        raise BadImage(f"corrupt or truncated: {err}") from None
    except Exception as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None
