"""Decode an image file of any common mode into an RGB float tensor in ``[0, 1]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from detlens.data.errors import DatasetError

# PIL opens 16-bit greyscale PNG/TIFF as one of these integer modes; ``Image.convert("RGB")``
# would clip them to 255 instead of rescaling, so they are scaled by hand.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_rgb_image(path: Path, *, context: str) -> torch.Tensor:
    """Reads ``path`` as ``FloatTensor[3, H, W]``, RGB, values in ``[0, 1]``.

    Greyscale, bilevel, palette (with or without transparency), greyscale+alpha, RGBA,
    CMYK and 16-bit greyscale files are converted; an alpha channel is dropped (not
    composited), as ``PIL.Image.convert("RGB")`` does. ``context`` prefixes every error
    message (it names the annotation file and the record).

    Raises:
        DatasetError: the file is missing, unreadable, or of an unsupported pixel mode.
    """
    if not path.is_file():
        raise DatasetError(f"{context}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            array = _to_rgb_array(img, path=path, context=context)
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError) as err:
        # PIL raises OSError for truncated files and SyntaxError for some corrupt headers; a
        # library that wraps PIL.Image.open (Ultralytics does, to load a HEIF plugin on demand)
        # may raise ImportError for a file PIL cannot identify.
        raise DatasetError(f"{context}: cannot read image file {path}: {type(err).__name__}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb_array(img: Image.Image, *, path: Path, context: str) -> np.ndarray:
    """PIL image of any supported mode -> ``float32[H, W, 3]`` in ``[0, 1]``."""
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float32)
        if grey.size and float(grey.max()) > 65535.0:
            raise DatasetError(
                f"{context}: image {path} has 32-bit integer pixels (max {grey.max():.0f}); "
                "only 8- and 16-bit images are supported"
            )
        grey = grey / 65535.0
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise DatasetError(
            f"{context}: image {path} has floating-point pixels (PIL mode 'F'), whose value "
            "range is unknown; convert it to an 8- or 16-bit image"
        )
    if img.mode in ("P", "PA"):
        # Going through RGBA honours palette transparency without PIL's warning about it.
        img = img.convert("RGBA")
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return rgb / 255.0
