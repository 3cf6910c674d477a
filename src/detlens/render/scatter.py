"""A 2-D embedding of detections as an image (colour = class, marker = TP / FP reason),
and the thumbnail crop of a detection shown next to its row in an embedding table.

Pure functions over arrays: no model, no logger, no pyplot state (a ``Figure`` drawn by
``FigureCanvasAgg``, garbage-collected when the call returns, so nothing ever shows up
in ``pyplot.get_fignums()`` and it is safe off the main thread).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from detlens.render.boxes import class_color

__all__ = ["OUTCOME_STYLES", "box_thumbnail", "render_scatter", "scatter_title"]

# marker, filled?, legend text. True positives are dots; every false positive is a cross
# variant (thin x / thin + / bold X / bold +), duplicates a three-armed cross, so the
# reason can be read off the shape while the colour keeps saying the class.
OUTCOME_STYLES: dict[str, tuple[str, bool, str]] = {
    "tp": ("o", True, "TP"),
    "fp": ("x", False, "FP"),
    "background": ("x", False, "FP background"),
    "localization": ("+", False, "FP localization"),
    "wrong_class": ("X", True, "FP wrong class"),
    "class_and_localization": ("P", True, "FP class + localization"),
    "duplicate": ("1", False, "FP duplicate"),
    "unknown": ("o", True, "no ground truth"),
}
"""``outcome -> (matplotlib marker, filled, legend label)``; outcomes are those of
``detlens.explainers.matching`` (``"tp"`` or an FP reason), a bare ``"fp"``, or
``"unknown"`` (images without ground truth, drawn as dots like true positives)."""

_DOTS = ("tp", "unknown")

_METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA"}


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def scatter_title(method: str, trustworthiness: float, silhouette: float) -> str:
    """``"t-SNE | trustworthiness 0.954 | silhouette 0.412"`` (``n/a`` for NaN)."""
    name = _METHOD_NAMES.get(method, method)
    return f"{name}  |  trustworthiness {_fmt(trustworthiness)}  |  silhouette {_fmt(silhouette)}"


def _class_colours(classes: Sequence[Any]) -> dict[Any, tuple[float, float, float]]:
    """The box-overlay colour of each integer class when those stay distinct, else a wider palette."""
    ints = all(isinstance(c, (int, np.integer)) for c in classes)
    if ints and len({int(c) % 10 for c in classes}) == len(classes):
        return {c: tuple(v / 255 for v in class_color(int(c))) for c in classes}
    cmap = colormaps["tab20"] if len(classes) <= 20 else colormaps["turbo"]
    steps = np.linspace(0.0, 1.0, len(classes)) if len(classes) > 20 else np.arange(len(classes)) / 20 + 0.025
    return {c: tuple(cmap(float(s))[:3]) for c, s in zip(classes, steps)}


def render_scatter(
    coords: Any,
    labels: Any,
    *,
    outcomes: Sequence[str] | None = None,
    class_names: Mapping[Any, str] | None = None,
    method: str = "",
    trustworthiness: float = float("nan"),
    silhouette: float = float("nan"),
    subtitle: str | None = None,
    size: tuple[int, int] = (960, 640),
    dpi: int = 100,
    max_legend_classes: int = 20,
) -> np.ndarray:
    """Draw ``coords`` coloured by class and shaped by outcome; return the pixels.

    Args:
        coords: ``float[N, 2]`` (tensor or array) projected coordinates.
        labels: ``N`` class labels (ints as in ``detlens.data``, or strings).
        outcomes: ``N`` outcomes, keys of :data:`OUTCOME_STYLES` (``"tp"``, an FP reason
            or ``"fp"``); ``None`` draws every point as a dot.
        class_names: ``{label: name}`` for the class legend (``"class <i>"`` otherwise).
        method: ``"pca"`` / ``"tsne"`` (or any name) for the title.
        trustworthiness: shown in the title (NaN: ``n/a``).
        silhouette: class silhouette shown in the title (NaN: ``n/a``).
        subtitle: an optional second title line (e.g. what was sampled, the global step).
        size: ``(width, height)`` of the image in pixels.
        dpi: resolution used to lay out text (point sizes scale with it).
        max_legend_classes: the largest classes listed in the legend; the rest are
            summarised as ``+N more``.

    Returns:
        ``uint8[height, width, 3]`` RGB.
    """
    xy = np.asarray(coords.detach().cpu() if hasattr(coords, "detach") else coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2], got shape {list(xy.shape)}")
    n = xy.shape[0]
    lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries for {n} points")
    outs = ["tp"] * n if outcomes is None else [str(o) for o in outcomes]
    if len(outs) != n:
        raise ValueError(f"outcomes has {len(outs)} entries for {n} points")
    unknown = sorted(set(outs) - set(OUTCOME_STYLES))
    if unknown:
        raise ValueError(f"unknown outcomes {unknown}; expected some of {list(OUTCOME_STYLES)}")

    width, height = size
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.09, 0.63, 0.78))
    title = scatter_title(method, trustworthiness, silhouette)
    fig.text(0.07, 0.955, title, fontsize=12, fontweight="bold", va="center")
    if subtitle:
        fig.text(0.07, 0.91, subtitle, fontsize=9, color="0.3", va="center")
    name = _METHOD_NAMES.get(method, method or "dim")
    ax.set_xlabel(f"{name} 1", fontsize=9)
    ax.set_ylabel(f"{name} 2", fontsize=9)
    if method == "tsne":
        # t-SNE coordinates have no units and only their neighbourhoods mean anything, so
        # no ticks or grid (as openTSNE's examples draw it); it also draws in 94 instead of
        # 117 ms (105 points, one CPU core).
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.tick_params(labelsize=7)
        ax.grid(True, lw=0.3, color="0.85")
        ax.set_axisbelow(True)

    class_counts = Counter(lab.tolist())
    classes = sorted(class_counts, key=lambda c: (str(type(c)), c))
    colours = _class_colours(classes)
    point_colours = np.array([colours[c] for c in lab.tolist()]).reshape(n, 3)
    dot = float(np.clip(900.0 / math.sqrt(max(n, 1)), 4.0, 60.0))  # marker area, points^2
    out_arr = np.asarray(outs)
    outcome_counts = Counter(outs)
    # True positives underneath, then false positives, rarest reason on top.
    order = sorted(outcome_counts, key=lambda o: (o not in _DOTS, -outcome_counts[o]))
    for outcome in order:
        marker, filled, _ = OUTCOME_STYLES[outcome]
        sel = out_arr == outcome
        if outcome in _DOTS:
            ax.scatter(xy[sel, 0], xy[sel, 1], s=dot, c=point_colours[sel], marker=marker,
                       alpha=0.55, linewidths=0, rasterized=True)
        elif filled:
            ax.scatter(xy[sel, 0], xy[sel, 1], s=dot * 3.0, c=point_colours[sel], marker=marker,
                       edgecolors="black", linewidths=0.5, alpha=0.95)
        else:
            ax.scatter(xy[sel, 0], xy[sel, 1], s=dot * 3.0, c=point_colours[sel], marker=marker,
                       linewidths=1.4, alpha=0.95)
    if n == 0:
        ax.text(0.5, 0.5, "no detections", transform=ax.transAxes, ha="center", va="center", color="0.4")

    names = {c: str((class_names or {}).get(c, c if isinstance(c, str) else f"class {c}")) for c in classes}
    shown = sorted(classes, key=lambda c: -class_counts[c])[:max_legend_classes]
    class_handles = [Patch(color=colours[c], label=f"{names[c]} ({class_counts[c]:,})") for c in shown]
    if len(classes) > len(shown):
        rest = sum(class_counts[c] for c in classes if c not in set(shown))
        class_handles.append(Patch(color="white", label=f"+{len(classes) - len(shown)} more ({rest:,})"))
    legend = ax.legend(handles=class_handles, title="class", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       fontsize=8, title_fontsize=9, frameon=False, borderaxespad=0.0)
    ax.add_artist(legend)
    outcome_handles = []
    for outcome in sorted(outcome_counts, key=lambda o: list(OUTCOME_STYLES).index(o)):
        marker, filled, text = OUTCOME_STYLES[outcome]
        outcome_handles.append(Line2D(
            [], [], ls="none", marker=marker, markersize=7, color="0.25",
            markerfacecolor="0.25" if filled else "none", markeredgecolor="black" if filled else "0.25",
            markeredgewidth=0.5 if filled else 1.4, label=f"{text} ({outcome_counts[outcome]:,})",
        ))
    ax.legend(handles=outcome_handles, title="outcome", loc="lower left", bbox_to_anchor=(1.02, 0.0),
              fontsize=8, title_fontsize=9, frameon=False, borderaxespad=0.0)

    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return pixels


def box_thumbnail(image: Any, box: Any, size: int = 64, margin: float = 0.15) -> np.ndarray:
    """A square crop centred on ``box`` (with ``margin`` of its longer side around it), scaled to ``size``.

    Square, so the box keeps its aspect ratio (the shorter direction shows more of the
    surroundings); parts of the window outside the image are grey.

    Args:
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]`` or ``uint8[H, W, 3]``.
        box: ``x1, y1, x2, y2`` pixels.
        size: side of the thumbnail in pixels.
        margin: context kept around the box, as a fraction of the box's longer side.

    Returns:
        ``uint8[size, size, 3]`` RGB.
    """
    if hasattr(image, "detach"):
        chw = image.detach().float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
        pixels = np.ascontiguousarray(chw.transpose(1, 2, 0))
    else:
        pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be FloatTensor[3, H, W] or uint8[H, W, 3], got {pixels.dtype}{list(pixels.shape)}")
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size}")
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    side = int(np.ceil(max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)))
    x0 = int(np.floor((x1 + x2) / 2.0 - side / 2.0))
    y0 = int(np.floor((y1 + y2) / 2.0 - side / 2.0))
    height, width = pixels.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - width, y0 + side - height)
    if pad:
        pixels = cv2.copyMakeBorder(pixels, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    crop = pixels[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    # Area averaging when shrinking (no aliasing of large boxes), bilinear when enlarging.
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=interpolation))
