"""Pixels for saliency maps: a colour-mapped map blended over its image, and a grid of maps.

Pure functions over arrays (NumPy or CPU tensors): no model, no logger, no pyplot state.
Maps are display maps in ``[0, 1]`` (see :func:`detlens.explainers.scale.display_maps`);
values outside are clipped, NaN is drawn as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from matplotlib import colormaps

from detlens.render.attention import to_uint8_image
from detlens.render.boxes import draw_boxes

__all__ = ["colorize", "merge_maps", "overlay_heatmap", "tile_images"]


def _as_map(value: Any, name: str = "map") -> np.ndarray:
    array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map [H, W], got shape {list(array.shape)}")
    return np.clip(np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def colorize(heat: Any, colormap: str = "jet") -> np.ndarray:
    """``[H, W]`` map in ``[0, 1]`` -> ``uint8[H, W, 3]`` RGB through a matplotlib colormap.

    Args:
        heat: the map (NumPy array or tensor).
        colormap: any matplotlib colormap name (``"jet"``, ``"turbo"``, ``"viridis"``, ...).
    """
    if colormap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}")
    # A 256-entry lookup table: the same quantisation as OpenCV's applyColorMap, any matplotlib map.
    lut = (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return lut[(_as_map(heat, "heat") * 255).round().astype(np.int64)]


def merge_maps(maps: Any) -> np.ndarray:
    """``[K, H, W]`` display maps -> one ``[H, W]`` map, their element-wise maximum
    (zeros when ``K == 0``), so every detection's evidence stays visible."""
    array = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if array.ndim != 3:
        raise ValueError(f"maps must be [K, H, W], got shape {list(array.shape)}")
    if array.shape[0] == 0:
        return np.zeros(array.shape[1:], np.float32)
    return np.nan_to_num(array, nan=0.0).max(axis=0)


def overlay_heatmap(
    image: Any,
    heat: Any,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    boxes: Any = None,
    labels: Any = None,
    scores: Any = None,
    class_names: dict[int, str] | None = None,
) -> np.ndarray:
    """Blend a map over its image; optionally draw boxes into the pixels.

    Args:
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]`` or ``uint8[H, W, 3]`` RGB.
        heat: ``[h, w]`` display map in ``[0, 1]``; resized bilinearly to ``(H, W)`` if needed.
        alpha: weight of the colour-mapped map, in ``[0, 1]``.
        colormap: matplotlib colormap name.
        boxes, labels, scores, class_names: boxes to draw (``float[N, 4]`` xyxy pixels);
            leave ``None`` when the boxes go to W&B as overlays instead.

    Returns:
        ``uint8[H, W, 3]`` RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = to_uint8_image(image)
    height, width = pixels.shape[:2]
    amap = _as_map(heat, "heat")
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    blended = cv2.addWeighted(pixels, 1.0 - alpha, colorize(amap, colormap), alpha, 0.0)
    if boxes is not None:
        blended = draw_boxes(blended, boxes, labels, scores=scores, class_names=class_names)
    return blended


def tile_images(tiles: Sequence[np.ndarray], *, columns: int, gap: int = 2) -> np.ndarray:
    """Lays ``k`` equally sized ``uint8[H, W, 3]`` tiles out row by row, ``columns`` per row.

    Returns:
        ``uint8[rows * (H + gap) - gap, cols * (W + gap) - gap, 3]``, white between tiles.
    """
    if not tiles:
        raise ValueError("no tiles to lay out")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        raise ValueError(f"tiles differ in size: {sorted({t.shape[:2] for t in tiles})}")
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return canvas
