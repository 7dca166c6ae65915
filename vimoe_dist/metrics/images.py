"""Images for the experiment trackers: whatever the caller has (a matplotlib figure, an image file, an array)
becomes one RGB uint8 array [H, W, 3], once, before it is handed to TensorBoard and W&B.

Figures are rendered through PNG in memory (`savefig`), so a figure made with pyplot, with the object API on an Agg
canvas (as `vimoe_dist.analysis.heatmaps` does) or with any other canvas gives the same pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np


def to_rgb(image: Any) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from a matplotlib `Figure`, a path to an image file, or an array [H, W],
    [H, W, 3] or [H, W, 4] of integer pixel values (0-255) or of floats in [0, 1] (alpha is dropped).

    Raises:
        ValueError: an array of another shape, or non-finite floats.
        TypeError: anything else.
        OSError: the file cannot be read or decoded.
    """
    if hasattr(image, "savefig"):  # a matplotlib Figure
        buffer = io.BytesIO()
        image.savefig(buffer, format="png")
        buffer.seek(0)
        return _decode(buffer)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return _decode(f)
    if isinstance(image, (str, bytes)) or not hasattr(image, "__array__"):
        raise TypeError(f"expected a matplotlib Figure, an image file or an array, got {type(image).__name__}")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
        raise ValueError(f"expected an image array [H, W], [H, W, 3] or [H, W, 4], got shape {list(array.shape)}")
    array = array[..., :3]
    kind = array.dtype.kind
    if kind in "iu":  # integers are 0-255 pixel values
        return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))
    if kind not in "fb" or (kind == "f" and not np.isfinite(array).all()):
        raise ValueError(f"expected integer pixel values or finite floats in [0, 1], got dtype {array.dtype}")
    return np.ascontiguousarray(np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8))


def _decode(stream) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(stream) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise OSError(str(e)) from None
