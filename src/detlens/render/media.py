"""Logger-neutral media records handed from a callback's ``log_results`` to the sinks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FILE_TYPES", "Media", "MediaImage", "MediaTable"]

FILE_TYPES = ("png", "jpg")
"""The image files W&B media are written as (``MediaImage.file_type``)."""


def _optional_array(value: Any, dtype: type, shape_tail: tuple[int, ...], name: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=dtype)
    if array.size == 0:
        return array.reshape((0, *shape_tail))
    if array.ndim != 1 + len(shape_tail) or array.shape[1:] != shape_tail:
        raise ValueError(f"{name} must have shape [N{''.join(f', {d}' for d in shape_tail)}], got {list(array.shape)}")
    return array


@dataclass
class MediaImage:
    """An image to log, with optional ground-truth and predicted boxes.

    Attributes:
        pixels: ``uint8[H, W, 3]`` RGB (an overlay already rendered, or the raw image).
        caption: shown under the image; by convention it contains ``step <global_step>``.
        gt_boxes, gt_labels: ``float[N, 4]`` xyxy pixels and ``int[N]`` labels ``1..C``.
        pred_boxes, pred_labels, pred_scores: ``float[K, 4]``, ``int[K]``, ``float[K]``.
        class_names: ``{label: name}`` for legends and box captions.
        file_type: how W&B stores it: ``"png"`` (lossless; rendered plots, whose text and
            thin lines JPEG would blur) or ``"jpg"`` (overlays on photographs: JPEG quality
            :data:`~detlens.sinks.wandb_payload.JPEG_QUALITY`, full-resolution colour).

    W&B shows the boxes as toggleable overlays; TensorBoard gets them drawn into the pixels.
    """

    pixels: np.ndarray
    caption: str = ""
    gt_boxes: np.ndarray | None = None
    gt_labels: np.ndarray | None = None
    pred_boxes: np.ndarray | None = None
    pred_labels: np.ndarray | None = None
    pred_scores: np.ndarray | None = None
    class_names: dict[int, str] | None = None
    file_type: str = "png"

    def __post_init__(self) -> None:
        if self.file_type not in FILE_TYPES:
            raise ValueError(f"MediaImage.file_type must be one of {FILE_TYPES}, got {self.file_type!r}")
        pixels = np.asarray(self.pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"MediaImage.pixels must be uint8[H, W, 3] RGB, got {pixels.dtype}{list(pixels.shape)}")
        self.pixels = pixels
        self.gt_boxes = _optional_array(self.gt_boxes, np.float64, (4,), "gt_boxes")
        self.gt_labels = _optional_array(self.gt_labels, np.int64, (), "gt_labels")
        self.pred_boxes = _optional_array(self.pred_boxes, np.float64, (4,), "pred_boxes")
        self.pred_labels = _optional_array(self.pred_labels, np.int64, (), "pred_labels")
        self.pred_scores = _optional_array(self.pred_scores, np.float64, (), "pred_scores")
        for boxes, labels, name in ((self.gt_boxes, self.gt_labels, "gt"), (self.pred_boxes, self.pred_labels, "pred")):
            if (boxes is None) != (labels is None) or (boxes is not None and len(boxes) != len(labels)):
                raise ValueError(f"{name}_boxes and {name}_labels must be given together with one label per box")
        if self.pred_scores is not None and (self.pred_boxes is None or len(self.pred_scores) != len(self.pred_boxes)):
            raise ValueError("pred_scores needs pred_boxes and one score per box")

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass
class MediaTable:
    """A table to log: W&B gets a ``wandb.Table`` (cells may be :class:`MediaImage`);
    TensorBoard gets the non-image columns as a Markdown text.

    Attributes:
        columns: column names.
        rows: one list of cells per row, ``len(row) == len(columns)``.
    """

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"MediaTable row {i} has {len(row)} cells for {len(self.columns)} columns")


@dataclass
class Media:
    """What one logging event logs; ``extra`` is handed to the ``then`` of
    :func:`detlens.sinks.log_media_later`.

    Picklable (plain arrays, strings and numbers), so detlens' media process can build it.
    """

    images: Mapping[str, list[MediaImage]] | None = None
    tables: Mapping[str, MediaTable] | None = None
    scalars: Mapping[str, float] | None = None
    extra: Any = None
