"""The focus record: what the explaining callbacks saw on the probe set, compact, versioned, append-only.

A run's focus record lets ``detlens compare`` / ``detlens report`` and
:class:`~detlens.callbacks.focus.FocusRegressionCallback` compare focus between logging
points and between runs without re-running any model.

Where
-----
``<W&B run dir>/files/detlens_focus/focus.jsonl`` (``run.dir`` is the ``files`` folder;
``wandb sync`` uploads it with an offline run, an online run also gets it as a
``detlens-focus`` artifact); with another Lightning logger ``<log_dir>/detlens_focus/``.

Format (``detlens-focus``, version 1)
--------------------------------------
UTF-8 JSON lines, appended and flushed one complete line at a time, so a run killed
mid-write leaves a file whose complete lines are all valid: the reader returns every
entry up to the last complete line and flags ``truncated``.

* Line 1, the header: ``{"format": "detlens-focus", "version": 1, "kind": "header",
  "created": <unix s>, "run_id": str | null}``. A reader refuses a newer major version.
* Every other line is an entry ``{"kind": ..., "log_key": str, "step": int, "epoch":
  int, ...}``; kinds a reader does not know are skipped (forward compatible):

  - ``"maps"`` (per-detection saliency maps of one logging point, e.g. Grad-CAM):
    ``method``, ``layer``, ``class_names`` (``{"1": "circle", ...}``), ``images``: one
    object per probe image with ``probe_index``, ``image_id``, ``height``, ``width``
    (pixels of the explained image) and arrays (``K`` detections, ``G`` ground-truth
    boxes, ``S`` = :data:`MAP_SIZE`):
    ``boxes`` float32 ``[K, 4]`` (xyxy image pixels), ``labels`` int64 ``[K]``,
    ``scores`` float32 ``[K]``, ``maps`` float16 ``[K, S, S]`` (area-averaged, each
    divided by its own peak, so in ``[0, 1]``), ``peaks`` float32 ``[K]`` (the raw
    maps' peaks: the scale divided out), ``gt_boxes`` float32 ``[G, 4]``, ``gt_labels``
    int64 ``[G]``, and per detection ``is_tp`` bool, ``energy_in_box``, ``chance``,
    ``pointing_game`` float32 ``[K]`` (NaN for false positives, flat maps or without ground
    truth), and optionally ``below_threshold`` bool ``[K]`` (best guesses shown below the
    score threshold; absent in older records: all ``False``).
  - ``"entropy"``: ``origin`` (``"probe"`` or ``"train"``) and ``entropies``:
    ``{layer: float32 [heads]}``, normalised entropy (1 = uniform attention); optionally
    ``temperatures``: ``{block: float}``, the learnable softmax temperatures at that reading
    (absent in older records and for models without one: ``{}``).
  - ``"embedding"``: ``method``, ``coords`` float32 ``[N, 2]``, ``labels`` int64 ``[N]``,
    ``outcomes`` (``N`` strings, ``"tp"`` or an FP kind), ``probe_index`` int64 ``[N]``,
    ``trustworthiness``, ``silhouette`` (floats or null), ``class_names``.
  - ``"boundary"`` (:class:`BoundaryPoint`, ``BoundaryCallback``): ``norm``, ``epsilon``,
    ``steps``, ``score_threshold``, ``class_names`` and ``images``: per probe image
    ``probe_index``, ``boxes`` float32 ``[K, 4]``, ``labels`` int64 ``[K]``, ``scores``
    float32 ``[K]``, ``margins`` float32 ``[K]`` (NaN: not lost within the budget) and
    ``flipped_to`` int64 ``[K]`` (``-1``: none).
  - ``"probe_image"``: ``probe_index``, ``image`` uint8 ``[h, w, 3]`` RGB, written once per
    ``(log_key, probe_index)`` and file, downscaled to at most :data:`THUMBNAIL_SIDE` px.

* An array is ``{"dtype": "float16", "shape": [K, 32, 32], "b64": <base64 of the
  little-endian C-order bytes>}``.

Size: a 32 x 32 float16 map is 2 KiB (2.7 KiB as base64); 8 probe images x 5 detections
make ~110 KiB per logging point.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detlens.explainers.scale import flat_maps

__all__ = [
    "DIRNAME",
    "FILENAME",
    "FORMAT",
    "MAP_SIZE",
    "THUMBNAIL_SIDE",
    "VERSION",
    "BoundaryImage",
    "BoundaryPoint",
    "EmbeddingPoint",
    "EntropyPoint",
    "FocusImage",
    "FocusRecord",
    "FocusRecordError",
    "FocusRecordWriter",
    "MapPoint",
    "downsample_maps",
    "find_record_file",
    "read_focus_record",
]

FORMAT = "detlens-focus"
VERSION = 1
DIRNAME = "detlens_focus"
FILENAME = "focus.jsonl"
MAP_SIZE = 32
THUMBNAIL_SIDE = 160


class FocusRecordError(ValueError):
    """The path is not a readable focus record (message names the file and line)."""


# ---------------------------------------------------------------------------------------
# Arrays in JSON
# ---------------------------------------------------------------------------------------


def _encode(array: Any, dtype: str) -> dict[str, Any]:
    a = np.ascontiguousarray(np.asarray(array.detach().cpu() if isinstance(array, Tensor) else array).astype(dtype))
    return {"dtype": dtype, "shape": list(a.shape), "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode("ascii")}


def _decode(obj: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(obj["dtype"]).newbyteorder("<")
    data = base64.b64decode(obj["b64"])
    return np.frombuffer(data, dtype=dtype).reshape(obj["shape"]).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------


def downsample_maps(maps: Tensor, size: int = MAP_SIZE) -> tuple[Tensor, Tensor]:
    """Per-detection maps -> what the record stores.

    Args:
        maps: ``FloatTensor[K, H, W]``, non-negative (raw scale).
        size: side ``S`` of the stored maps.

    Returns:
        ``(maps FloatTensor[K, S, S] in [0, 1], peaks FloatTensor[K])``: area-averaged, then
        each divided by its own peak; a flat map (:func:`detlens.explainers.scale.flat_maps`,
        all-zero ones included) is stored as zeros. ``peaks`` are the peaks of the
        area-averaged raw maps.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [K, H, W], got shape {list(maps.shape)}")
    m = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0).clamp_min(0)
    if m.shape[0] == 0:
        return torch.zeros(0, size, size), torch.zeros(0)
    pooled = F.adaptive_avg_pool2d(m[:, None], (size, size))[:, 0]  # [K, S, S]
    peaks = pooled.flatten(1).amax(1)
    keep = (peaks > 0) & ~flat_maps(m)
    scaled = torch.where(keep[:, None, None], pooled / peaks.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None], 0.0)
    return scaled.clamp(0, 1), peaks


@dataclass
class FocusImage:
    """One probe image's explained detections at one logging point (NumPy, see the module docstring)."""

    probe_index: int
    image_id: int | None
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    peaks: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    is_tp: np.ndarray
    energy_in_box: np.ndarray
    chance: np.ndarray
    pointing_game: np.ndarray
    below_threshold: np.ndarray | None = None
    """``bool[K]``: shown as the model's best guesses below the callback's score threshold
    (``GradCAMCallback(min_detections=...)``); never true positives, left out of drift and
    of every focus metric. ``None`` (records written before it) reads as all ``False``."""

    def __post_init__(self) -> None:
        if self.below_threshold is None or len(self.below_threshold) != len(self):
            self.below_threshold = np.zeros(len(self), bool)

    def confident(self) -> FocusImage:
        """This image's detections without the below-threshold ones (what drift and gates use)."""
        below = np.asarray(self.below_threshold, bool)
        if not below.any():
            return self
        keep = ~below
        arrays = {name: getattr(self, name)[keep] for name in self._ARRAYS if name not in ("gt_boxes", "gt_labels")}
        return FocusImage(self.probe_index, self.image_id, self.height, self.width, gt_boxes=self.gt_boxes,
                          gt_labels=self.gt_labels, below_threshold=np.zeros(int(keep.sum()), bool), **arrays)

    @classmethod
    def from_tensors(
        cls,
        probe_index: int,
        boxes: Tensor,
        labels: Tensor,
        scores: Tensor,
        raw_maps: Tensor,
        focus: Mapping[str, Tensor] | None = None,
        target: Mapping[str, Any] | None = None,
        map_size: int = MAP_SIZE,
        below_threshold: Tensor | None = None,
    ) -> FocusImage:
        """Builds the record of one image from an explainer's output.

        Args:
            boxes ``[K, 4]``, labels ``[K]``, scores ``[K]``: the explained detections.
            raw_maps: ``FloatTensor[K, H, W]`` maps at image resolution (``H, W`` recorded).
            focus: :func:`detlens.explainers.api.box_focus` output, or ``None``.
            target: the dataset target (``boxes``, ``labels``, ``image_id``), or ``None``.
            below_threshold: ``BoolTensor[K]``, detections shown below the score threshold.
        """
        k = int(boxes.shape[0])
        small, peaks = downsample_maps(raw_maps, map_size)
        nan = np.full(k, np.nan, np.float32)
        target = target or {}
        image_id = target.get("image_id")
        image_id = int(image_id.item() if isinstance(image_id, Tensor) else image_id) if image_id is not None else None
        gt_boxes = target.get("boxes")
        gt_labels = target.get("labels")

        def arr(x: Any, dtype: Any, fallback: np.ndarray) -> np.ndarray:
            if x is None:
                return fallback
            return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x).astype(dtype)

        return cls(
            probe_index=int(probe_index),
            image_id=image_id,
            height=int(raw_maps.shape[-2]),
            width=int(raw_maps.shape[-1]),
            boxes=arr(boxes, np.float32, np.zeros((0, 4), np.float32)).reshape(-1, 4),
            labels=arr(labels, np.int64, np.zeros(0, np.int64)).reshape(-1),
            scores=arr(scores, np.float32, np.zeros(0, np.float32)).reshape(-1),
            maps=small.numpy().astype(np.float16),
            peaks=peaks.numpy().astype(np.float32),
            gt_boxes=arr(gt_boxes, np.float32, np.zeros((0, 4), np.float32)).reshape(-1, 4),
            gt_labels=arr(gt_labels, np.int64, np.zeros(0, np.int64)).reshape(-1),
            is_tp=arr(None if focus is None else focus["is_tp"], bool, np.zeros(k, bool)).reshape(-1),
            energy_in_box=arr(None if focus is None else focus["energy_in_box"], np.float32, nan).reshape(-1),
            chance=arr(None if focus is None else focus["chance"], np.float32, nan).reshape(-1),
            pointing_game=arr(None if focus is None else focus["pointing_game"], np.float32, nan).reshape(-1),
            below_threshold=arr(below_threshold, bool, np.zeros(k, bool)).reshape(-1),
        )

    _ARRAYS = {
        "boxes": "float32", "labels": "int64", "scores": "float32", "maps": "float16", "peaks": "float32",
        "gt_boxes": "float32", "gt_labels": "int64", "is_tp": "bool", "energy_in_box": "float32",
        "chance": "float32", "pointing_game": "float32",
    }

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe_index": self.probe_index, "image_id": self.image_id, "height": self.height, "width": self.width}
        out.update({name: _encode(getattr(self, name), dtype) for name, dtype in self._ARRAYS.items()})
        out["below_threshold"] = _encode(self.below_threshold, "bool")  # optional: older readers skip it
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FocusImage:
        arrays = {name: _decode(obj[name]) for name in cls._ARRAYS}
        below = _decode(obj["below_threshold"]) if "below_threshold" in obj else None
        return cls(probe_index=int(obj["probe_index"]), image_id=obj.get("image_id"), height=int(obj["height"]),
                   width=int(obj["width"]), below_threshold=below, **arrays)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class MapPoint:
    """Per-detection maps of the probe set at one logging point (entry kind ``"maps"``)."""

    log_key: str
    step: int
    epoch: int
    method: str
    layer: str | None
    images: list[FocusImage]
    class_names: dict[int, str] = field(default_factory=dict)

    kind = "maps"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "log_key": self.log_key, "step": self.step, "epoch": self.epoch,
            "method": self.method, "layer": self.layer,
            "class_names": {str(k): v for k, v in self.class_names.items()},
            "images": [im.to_json() for im in self.images],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MapPoint:
        return cls(
            log_key=obj["log_key"], step=int(obj["step"]), epoch=int(obj["epoch"]), method=obj.get("method", ""),
            layer=obj.get("layer"), images=[FocusImage.from_json(im) for im in obj["images"]],
            class_names={int(k): str(v) for k, v in (obj.get("class_names") or {}).items()},
        )

    def image(self, probe_index: int) -> FocusImage | None:
        return next((im for im in self.images if im.probe_index == probe_index), None)


@dataclass
class EntropyPoint:
    """Attention entropy per layer and head at one reading (entry kind ``"entropy"``).

    ``entropies``: ``{layer: float32[heads]}``; ``origin``: ``"probe"`` (probe set, eval
    mode) or ``"train"`` (the training forward); ``temperatures``: ``{block: T}`` of the
    blocks with a learnable softmax temperature (empty without).
    """

    log_key: str
    step: int
    epoch: int
    origin: str
    entropies: dict[str, np.ndarray]
    temperatures: dict[str, float] = field(default_factory=dict)

    kind = "entropy"

    def to_json(self) -> dict[str, Any]:
        out = {
            "kind": self.kind, "log_key": self.log_key, "step": self.step, "epoch": self.epoch, "origin": self.origin,
            "entropies": {k: _encode(v, "float32") for k, v in self.entropies.items()},
        }
        if self.temperatures:  # optional: older readers skip it
            out["temperatures"] = {k: float(v) for k, v in self.temperatures.items()}
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EntropyPoint:
        return cls(log_key=obj["log_key"], step=int(obj["step"]), epoch=int(obj["epoch"]), origin=obj.get("origin", "probe"),
                   entropies={k: _decode(v) for k, v in obj["entropies"].items()},
                   temperatures={str(k): float(v) for k, v in (obj.get("temperatures") or {}).items()})

    def flat(self) -> dict[str, float]:
        """``{"<layer>/head<i>": entropy}``."""
        return {f"{layer}/head{i}": float(v) for layer, values in self.entropies.items() for i, v in enumerate(np.asarray(values).reshape(-1))}


@dataclass
class EmbeddingPoint:
    """A 2-D projection of the probe detections' box features (entry kind ``"embedding"``)."""

    log_key: str
    step: int
    epoch: int
    method: str
    coords: np.ndarray
    labels: np.ndarray
    outcomes: list[str]
    probe_index: np.ndarray
    trustworthiness: float | None = None
    silhouette: float | None = None
    class_names: dict[int, str] = field(default_factory=dict)

    kind = "embedding"

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not np.isfinite(x) else float(x)

        return {
            "kind": self.kind, "log_key": self.log_key, "step": self.step, "epoch": self.epoch, "method": self.method,
            "coords": _encode(np.asarray(self.coords).reshape(-1, 2), "float32"),
            "labels": _encode(self.labels, "int64"), "outcomes": [str(o) for o in self.outcomes],
            "probe_index": _encode(self.probe_index, "int64"),
            "trustworthiness": num(self.trustworthiness), "silhouette": num(self.silhouette),
            "class_names": {str(k): v for k, v in self.class_names.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EmbeddingPoint:
        return cls(
            log_key=obj["log_key"], step=int(obj["step"]), epoch=int(obj["epoch"]), method=obj.get("method", ""),
            coords=_decode(obj["coords"]), labels=_decode(obj["labels"]), outcomes=list(obj["outcomes"]),
            probe_index=_decode(obj["probe_index"]), trustworthiness=obj.get("trustworthiness"),
            silhouette=obj.get("silhouette"),
            class_names={int(k): str(v) for k, v in (obj.get("class_names") or {}).items()},
        )


@dataclass
class BoundaryImage:
    """The margins of one probe image's detections (see the module docstring)."""

    probe_index: int
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    margins: np.ndarray
    flipped_to: np.ndarray

    _ARRAYS = {"boxes": "float32", "labels": "int64", "scores": "float32", "margins": "float32", "flipped_to": "int64"}

    def to_json(self) -> dict[str, Any]:
        return {"probe_index": self.probe_index, **{n: _encode(np.asarray(getattr(self, n)), d) for n, d in self._ARRAYS.items()}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BoundaryImage:
        return cls(probe_index=int(obj["probe_index"]), **{n: _decode(obj[n]) for n in cls._ARRAYS})

    def __len__(self) -> int:
        return int(np.asarray(self.margins).shape[0])


@dataclass
class BoundaryPoint:
    """Per-detection margins of the probe set at one logging point (entry kind ``"boundary"``)."""

    log_key: str
    step: int
    epoch: int
    norm: str
    epsilon: float
    steps: int
    score_threshold: float
    images: list[BoundaryImage]
    class_names: dict[int, str] = field(default_factory=dict)

    kind = "boundary"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "log_key": self.log_key, "step": self.step, "epoch": self.epoch, "norm": self.norm,
            "epsilon": float(self.epsilon), "steps": int(self.steps), "score_threshold": float(self.score_threshold),
            "class_names": {str(k): v for k, v in self.class_names.items()},
            "images": [im.to_json() for im in self.images],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BoundaryPoint:
        return cls(
            log_key=obj["log_key"], step=int(obj["step"]), epoch=int(obj["epoch"]), norm=str(obj["norm"]),
            epsilon=float(obj["epsilon"]), steps=int(obj["steps"]), score_threshold=float(obj["score_threshold"]),
            images=[BoundaryImage.from_json(im) for im in obj["images"]],
            class_names={int(k): str(v) for k, v in (obj.get("class_names") or {}).items()},
        )

    def margins(self) -> tuple[np.ndarray, np.ndarray]:
        """``(margins float64[N], labels int64[N])`` over all images (NaN: not lost)."""
        if not self.images:
            return np.zeros(0), np.zeros(0, np.int64)
        return (np.concatenate([np.asarray(im.margins, np.float64) for im in self.images]),
                np.concatenate([np.asarray(im.labels, np.int64) for im in self.images]))

    def summary(self, class_names: Mapping[int, str] | None = None) -> dict[str, float]:
        """``{"margin_median", "not_lost_share"}`` and per class ``"<name>/<class>"`` (medians over lost detections)."""
        names = {**self.class_names, **dict(class_names or {})}
        margins, labels = self.margins()
        out: dict[str, float] = {}

        def add(suffix: str, m: np.ndarray) -> None:
            if not m.size:
                return
            lost = np.isfinite(m)
            out["not_lost_share" + suffix] = float((~lost).mean())
            if lost.any():
                out["margin_median" + suffix] = float(np.median(m[lost]))

        add("", margins)
        for label in sorted(set(labels.tolist())):
            add(f"/{names.get(int(label), str(label))}", margins[labels == label])
        return out


_ENTRY_TYPES: dict[str, Any] = {"maps": MapPoint, "entropy": EntropyPoint, "embedding": EmbeddingPoint,
                                "boundary": BoundaryPoint}


# ---------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------


class FocusRecordWriter:
    """Appends entries to ``<directory>/focus.jsonl`` (creating it with its header).

    Each entry is one JSON line written with a single ``write`` and flushed + fsynced,
    so a crash loses at most the line being written. Re-opening an existing record (a
    resumed run in the same directory) appends to it; a torn last line is terminated
    first so the next entry starts on a line of its own.

    Args:
        directory: the record folder (created).
        run_id: stored in the header (e.g. the W&B run id).
    """

    def __init__(self, directory: str | Path, run_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.directory.mkdir(parents=True, exist_ok=True)
        self._images_written: set[tuple[str, int]] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            existing = read_focus_record(self.path)  # raises on a foreign file: never append to one
            self._images_written = set(existing.probe_images)
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                self._append_raw("\n")
        else:
            header = {"format": FORMAT, "version": VERSION, "kind": "header", "created": time.time(), "run_id": run_id}
            self._append_raw(json.dumps(header) + "\n")

    def _append_raw(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write(self, entry: MapPoint | EntropyPoint | EmbeddingPoint | BoundaryPoint) -> None:
        """Appends one entry as one complete line."""
        self._append_raw(json.dumps(entry.to_json(), allow_nan=True, separators=(",", ":")) + "\n")

    def has_probe_image(self, log_key: str, probe_index: int) -> bool:
        return (log_key, int(probe_index)) in self._images_written

    def write_probe_image(self, log_key: str, probe_index: int, pixels: np.ndarray) -> None:
        """Stores a probe image (``uint8[H, W, 3]``) once per ``(log_key, probe_index)``, downscaled to
        at most :data:`THUMBNAIL_SIDE` px on its longer side."""
        if self.has_probe_image(log_key, probe_index):
            return
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be uint8[H, W, 3], got {pixels.dtype}{list(pixels.shape)}")
        h, w = pixels.shape[:2]
        if max(h, w) > THUMBNAIL_SIDE:
            import cv2

            scale = THUMBNAIL_SIDE / max(h, w)
            pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        entry = {"kind": "probe_image", "log_key": log_key, "probe_index": int(probe_index), "image": _encode(pixels, "uint8")}
        self._append_raw(json.dumps(entry, separators=(",", ":")) + "\n")
        self._images_written.add((log_key, int(probe_index)))


# ---------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------


@dataclass
class FocusRecord:
    """A focus record read back.

    Attributes:
        path: the ``focus.jsonl`` file; header: its first line.
        maps, entropy, embeddings, boundary: entries in file order.
        probe_images: ``{(log_key, probe_index): uint8[h, w, 3]}``.
        truncated: the file ended inside a line (a run stopped mid-write); everything
            before it was read.
        skipped: complete lines that could not be parsed (e.g. a line torn by a crash
            and then followed by a resumed run's entries).
    """

    path: Path
    header: dict[str, Any]
    maps: list[MapPoint] = field(default_factory=list)
    entropy: list[EntropyPoint] = field(default_factory=list)
    embeddings: list[EmbeddingPoint] = field(default_factory=list)
    boundary: list[BoundaryPoint] = field(default_factory=list)
    probe_images: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    truncated: bool = False
    skipped: int = 0

    @property
    def name(self) -> str:
        """A short label: the W&B run folder's name when the record lives in one, else the folder's."""
        parent = self.path.parent
        if parent.name == DIRNAME and parent.parent.name == "files":
            return parent.parent.parent.name
        return parent.name if parent.name != DIRNAME else parent.parent.name

    def map_keys(self) -> list[str]:
        return list(dict.fromkeys(p.log_key for p in self.maps))

    def map_points(self, log_key: str | None = None) -> list[MapPoint]:
        """Map entries of ``log_key`` (``None``: the first key in the file), sorted by step (stable)."""
        keys = self.map_keys()
        if log_key is None:
            log_key = keys[0] if keys else None
        return sorted((p for p in self.maps if p.log_key == log_key), key=lambda p: p.step)

    def entropy_points(self, origin: str | None = None) -> list[EntropyPoint]:
        """Entropy entries of ``origin`` (``None``: probe-set ones if any, else training ones), sorted by step."""
        if origin is None:
            origin = "probe" if any(p.origin == "probe" for p in self.entropy) else "train"
        return sorted((p for p in self.entropy if p.origin == origin), key=lambda p: p.step)

    def boundary_points(self, log_key: str | None = None) -> list[BoundaryPoint]:
        """Boundary entries of ``log_key`` (``None``: the first key of a boundary entry), sorted by step."""
        keys = list(dict.fromkeys(p.log_key for p in self.boundary))
        if log_key is None:
            log_key = keys[0] if keys else None
        return sorted((p for p in self.boundary if p.log_key == log_key), key=lambda p: p.step)

    def class_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for p in [*self.maps, *self.embeddings, *self.boundary]:
            names.update(p.class_names)
        return names


def find_record_file(path: str | Path) -> Path:
    """The ``focus.jsonl`` behind ``path``: the file itself, a ``detlens_focus`` folder, a W&B run
    folder (``<run>/files/detlens_focus``), its ``files`` folder, or a W&B root holding exactly one run.

    Raises:
        FocusRecordError: none found (the message lists where it looked).
    """
    path = Path(path)
    candidates = [path, path / FILENAME, path / DIRNAME / FILENAME, path / "files" / DIRNAME / FILENAME]
    for c in candidates:
        if c.is_file():
            return c
    if path.is_dir():
        found = sorted(path.glob(f"**/{DIRNAME}/{FILENAME}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listing = ", ".join(str(f.parent.parent.parent) for f in found[:5])
            raise FocusRecordError(f"{path} holds {len(found)} focus records ({listing}...); name one run folder")
    raise FocusRecordError(
        f"no focus record at {path}: looked for {FILENAME} in it, in {DIRNAME}/ and in files/{DIRNAME}/ "
        "(a W&B run folder); a run gets one when an explaining callback (e.g. GradCAMCallback) logged"
    )


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, complete)``; the last line is incomplete when it has no newline."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            yield number, raw.decode("utf-8", errors="replace"), complete


def read_focus_record(path: str | Path) -> FocusRecord:
    """Reads a focus record (see :func:`find_record_file` for the accepted paths).

    Raises:
        FocusRecordError: not a focus record, or a newer format version than this reader's.
    """
    file = find_record_file(path)
    record: FocusRecord | None = None
    for number, text, complete in _lines(file):
        if not complete:
            if record is not None:
                record.truncated = True
            break
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            if record is None:
                raise FocusRecordError(f"{file}: line 1 is not a {FORMAT} header") from None
            record.skipped += 1
            continue
        if record is None:
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise FocusRecordError(f"{file}: line 1 is not a {FORMAT} header")
            version = int(obj.get("version", 0))
            if version > VERSION:
                raise FocusRecordError(f"{file}: {FORMAT} version {version}; this detlens reads up to version {VERSION}")
            record = FocusRecord(path=file, header=obj)
            continue
        kind = obj.get("kind") if isinstance(obj, dict) else None
        try:
            if kind == "probe_image":
                record.probe_images[(obj["log_key"], int(obj["probe_index"]))] = _decode(obj["image"])
            elif kind in _ENTRY_TYPES:
                entry = _ENTRY_TYPES[kind].from_json(obj)
                {"maps": record.maps, "entropy": record.entropy, "embedding": record.embeddings,
                 "boundary": record.boundary}[kind].append(entry)
        except (KeyError, TypeError, ValueError) as err:
            raise FocusRecordError(f"{file}: line {number} ({kind}) is malformed: {type(err).__name__}: {err}") from err
    if record is None:
        raise FocusRecordError(f"{file}: empty, no {FORMAT} header")
    return record

