"""Pixels for attention: a map blended over its image with the detection's box, and
a layer x head entropy heatmap. Pure functions returning ``uint8[H, W, 3]`` RGB arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detlens.render.boxes import draw_boxes

__all__ = ["entropy_heatmap", "overlay_attention", "to_uint8_image"]


def to_uint8_image(image: Any) -> np.ndarray:
    """``FloatTensor[3, H, W]`` in ``[0, 1]`` (detlens' image convention) or an
    ``uint8[H, W, 3]`` array -> contiguous ``uint8[H, W, 3]`` RGB."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
        return np.ascontiguousarray((image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be uint8[H, W, 3], got {arr.dtype}{list(arr.shape)}")
    return np.ascontiguousarray(arr)


def overlay_attention(
    image: Any,
    attention: Any,
    box: Sequence[float] | None = None,
    *,
    label: int | None = None,
    score: float | None = None,
    class_names: Mapping[int, str] | None = None,
    alpha: float = 0.5,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend an attention map over its image and draw the detection's box.

    Args:
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]`` or ``uint8[H, W, 3]`` RGB.
        attention: ``[h, w]`` map in ``[0, 1]`` (e.g. ``AttentionMaps.display[i]``); resized
            to ``(H, W)`` if it differs. Values outside ``[0, 1]`` are clipped.
        box: ``(x1, y1, x2, y2)`` in image pixels, or ``None``.
        label, score, class_names: caption of the box (see ``render.boxes.draw_boxes``).
        alpha: weight of the colour-mapped attention in the blend, in ``[0, 1]``.
        colormap: an OpenCV colormap id (``cv2.COLORMAP_*``).

    Returns:
        ``uint8[H, W, 3]`` RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = to_uint8_image(image)
    amap = attention.detach().float().cpu().numpy() if isinstance(attention, torch.Tensor) else np.asarray(attention, np.float32)
    if amap.ndim != 2:
        raise ValueError(f"attention must be a 2-D map [h, w], got shape {list(amap.shape)}")
    height, width = pixels.shape[:2]
    if amap.shape != (height, width):
        amap = cv2.resize(amap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    heat_bgr = cv2.applyColorMap((np.clip(np.nan_to_num(amap), 0.0, 1.0) * 255).astype(np.uint8), colormap)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(pixels, 1.0 - alpha, heat, alpha, 0.0)
    if box is None:
        return blended
    thickness = max(2, round(min(height, width) / 160))
    # A dark outline under the class-coloured box keeps it visible on any colormap hue.
    x1, y1, x2, y2 = (int(round(float(v))) for v in np.asarray(box, np.float64).reshape(4))
    cv2.rectangle(blended, (x1, y1), (x2, y2), (0, 0, 0), thickness + 2, lineType=cv2.LINE_AA)
    return draw_boxes(
        blended,
        np.asarray(box, np.float64).reshape(1, 4),
        None if label is None else [label],
        scores=None if score is None else [score],
        class_names=class_names,
        thickness=thickness,
    )


def entropy_heatmap(
    entropies: Mapping[str, Any],
    *,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool | None = None,
    dpi: int = 100,
) -> np.ndarray:
    """A layer x head heatmap of normalised attention entropy.

    Args:
        entropies: layer name -> ``[heads]`` values (e.g. ``EntropyMonitor.collect()``),
            rows in the given order; layers with fewer heads leave blank cells.
        title: figure title (put the global step in it).
        vmin, vmax: colour scale; the default ``[0, 1]`` keeps figures comparable over time.
        annotate: write the value in each cell; default when the grid has at most 256 cells.
        dpi: resolution of the rendered figure.

    Returns:
        ``uint8[H, W, 3]`` RGB. The figure is built without pyplot, so no global figure is
        left open.
    """
    if not entropies:
        raise ValueError("entropies is empty: nothing to draw")
    layers = list(entropies)
    rows = [np.asarray(torch.as_tensor(entropies[k]).detach().float().cpu().reshape(-1)) for k in layers]
    heads = max(len(r) for r in rows)
    grid = np.full((len(layers), heads), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    annotate = grid.size <= 256 if annotate is None else annotate

    fig = Figure(figsize=(1.6 + 0.45 * heads + 0.08 * max(len(k) for k in layers), 1.0 + 0.32 * len(layers)), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("head", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    if annotate:
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                shade = (value - vmin) / max(vmax - vmin, 1e-12)
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="black" if shade > 0.6 else "white")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("normalised entropy", fontsize=7)
    colorbar.ax.tick_params(labelsize=6)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
