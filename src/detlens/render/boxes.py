"""Detection boxes as W&B box-overlay dicts, and drawn into pixels (for TensorBoard).

Pure functions over NumPy arrays: no model, no logger. Boxes are ``float[N, 4]``
``x1, y1, x2, y2`` in absolute pixels of the image they belong to; labels are the
contiguous ``1..C`` of ``detlens.data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib import colormaps

__all__ = ["class_color", "class_labels_for", "draw_boxes", "wandb_box_data", "wandb_boxes"]


def _as_boxes(boxes: Any) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if boxes is not None else np.zeros((0, 4))
    return array


def _as_vector(values: Any, n: int, name: str, dtype: type) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} entries for {n} boxes")
    return array


def class_labels_for(labels: Any, class_names: Mapping[int, str] | None = None) -> dict[int, str]:
    """``{label: name}`` covering every label in ``labels`` (unknown ones become ``"class <i>"``).

    W&B needs a name for every ``class_id`` it is given; known names are all kept so the
    legend is the same on every image.
    """
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    for label in np.asarray(labels if labels is not None else [], dtype=np.int64).reshape(-1).tolist():
        names.setdefault(int(label), f"class {label}")
    return names


def wandb_box_data(
    boxes: Any,
    labels: Any,
    *,
    image_size: tuple[int, int],
    scores: Any = None,
    class_names: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """One W&B ``box_data`` entry per box (``domain="pixel"``), clipped to the image.

    Args:
        boxes: ``float[N, 4]`` xyxy pixels.
        labels: ``int[N]`` class ids.
        image_size: ``(height, width)`` in pixels; boxes are clipped to it.
        scores: optional ``float[N]`` confidences in ``[0, 1]`` (shown in the caption and
            as ``scores={"score": s}``, which W&B's UI can filter on).
        class_names: ``{label: name}`` for the captions.

    Returns:
        ``[{"position": {"minX", "minY", "maxX", "maxY"}, "domain": "pixel",
        "class_id": int, "box_caption": str, "scores": {"score": float}?}, ...]``
    """
    xyxy = _as_boxes(boxes)
    n = xyxy.shape[0]
    label_arr = _as_vector(labels, n, "labels", np.int64)
    if label_arr is None:
        raise ValueError("labels are required")
    score_arr = _as_vector(scores, n, "scores", np.float64)
    height, width = image_size
    xyxy = xyxy.copy()
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
    names = class_labels_for(label_arr, class_names)
    data: list[dict[str, Any]] = []
    for i in range(n):
        label = int(label_arr[i])
        entry: dict[str, Any] = {
            "position": {
                "minX": float(xyxy[i, 0]),
                "minY": float(xyxy[i, 1]),
                "maxX": float(xyxy[i, 2]),
                "maxY": float(xyxy[i, 3]),
            },
            "domain": "pixel",
            "class_id": label,
            "box_caption": names[label],
        }
        if score_arr is not None:
            entry["box_caption"] = f"{names[label]} {score_arr[i]:.2f}"
            entry["scores"] = {"score": float(score_arr[i])}
        data.append(entry)
    return data


def wandb_boxes(
    image_size: tuple[int, int],
    *,
    gt_boxes: Any = None,
    gt_labels: Any = None,
    pred_boxes: Any = None,
    pred_labels: Any = None,
    pred_scores: Any = None,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``boxes=`` argument of ``wandb.Image``: ``{"ground_truth": ..., "predictions": ...}``.

    A group is present when its boxes are given (an empty ``[0, 4]`` array gives an empty
    group, so "no detections" is visible as such). Both groups share one ``class_labels``.
    """
    all_labels = [np.asarray(x if x is not None else [], dtype=np.int64).reshape(-1) for x in (gt_labels, pred_labels)]
    class_labels = class_labels_for(np.concatenate(all_labels), class_names)
    groups: dict[str, dict[str, Any]] = {}
    if gt_boxes is not None:
        groups["ground_truth"] = {
            "box_data": wandb_box_data(gt_boxes, gt_labels, image_size=image_size, class_names=class_labels),
            "class_labels": class_labels,
        }
    if pred_boxes is not None:
        groups["predictions"] = {
            "box_data": wandb_box_data(
                pred_boxes, pred_labels, image_size=image_size, scores=pred_scores, class_names=class_labels
            ),
            "class_labels": class_labels,
        }
    return groups


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed RGB colour per class id (matplotlib ``tab10``), the same on every image."""
    return _TAB10[int(label) % 10]


def _tab10(index: int) -> tuple[int, int, int]:
    r, g, b, _ = colormaps["tab10"](index)
    return int(r * 255), int(g * 255), int(b * 255)


_TAB10 = [_tab10(i) for i in range(10)]  # looked up per box: a colormap call is ~0.2 ms


def draw_boxes(
    pixels: np.ndarray,
    boxes: Any,
    labels: Any,
    *,
    scores: Any = None,
    class_names: Mapping[int, str] | None = None,
    dashed: bool = False,
    thickness: int = 1,
) -> np.ndarray:
    """Returns a copy of ``pixels`` (``uint8[H, W, 3]`` RGB) with the boxes drawn in.

    Each class has its colour (:func:`class_color`); ``dashed=True`` draws only the
    corners of each box (used for ground truth next to solid predictions).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8[H, W, 3], got {pixels.dtype}{list(pixels.shape)}")
    canvas = np.ascontiguousarray(pixels).copy()
    xyxy = _as_boxes(boxes)
    n = xyxy.shape[0]
    label_arr = _as_vector(labels, n, "labels", np.int64)
    score_arr = _as_vector(scores, n, "scores", np.float64)
    names = class_labels_for(label_arr, class_names)
    for i in range(n):
        x1, y1, x2, y2 = (int(round(v)) for v in xyxy[i])
        label = int(label_arr[i]) if label_arr is not None else 0
        color = class_color(label)
        if dashed:
            _draw_corners(canvas, (x1, y1, x2, y2), color, thickness)
        else:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_AA)
        text = names.get(label, "") if label_arr is not None else ""
        if score_arr is not None:
            text = f"{text} {score_arr[i]:.2f}".strip()
        if text:
            cv2.putText(
                canvas, text, (x1, max(y1 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1, cv2.LINE_AA
            )
    return canvas


def _draw_corners(canvas: np.ndarray, xyxy: Sequence[int], color: tuple[int, int, int], thickness: int) -> None:
    """Quarter-length corner strokes: marks a box without hiding what is inside it."""
    x1, y1, x2, y2 = xyxy
    dx, dy = max((x2 - x1) // 4, 1), max((y2 - y1) // 4, 1)
    for (xa, ya), (xb, yb) in (
        ((x1, y1), (x1 + dx, y1)), ((x1, y1), (x1, y1 + dy)),
        ((x2, y1), (x2 - dx, y1)), ((x2, y1), (x2, y1 + dy)),
        ((x1, y2), (x1 + dx, y2)), ((x1, y2), (x1, y2 - dy)),
        ((x2, y2), (x2 - dx, y2)), ((x2, y2), (x2, y2 - dy)),
    ):
        cv2.line(canvas, (xa, ya), (xb, yb), color, thickness, lineType=cv2.LINE_AA)
