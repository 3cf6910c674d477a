"""Focus drift between two logging points (of one run, or of two runs on the same probe set).

Detections of the same probe image are matched across the two points by class and IoU
(a one-to-one assignment maximising total IoU, SciPy's Hungarian solver); each matched
pair's maps (the record's ``S x S`` maps) are compared by

* Spearman rank correlation ``rho`` (does the map rank the same pixels highest?), and
* cosine similarity (do the maps put their mass in the same places?).

The **drift** of a pair is ``1 - rho``: 0 for maps ranked identically, 1 for unrelated
maps, up to 2 for inverted ones. Where ``rho`` is undefined (a constant map, e.g. all
zero after Grad-CAM's ReLU) the drift is 0 if both maps are equal and 1 otherwise. A
point's drift is the mean over its matched pairs; detections without a partner are
counted separately (``match_rate``), so a changed set of detections is visible next to a
changed focus, not mixed into it.

Attention-entropy drift is the absolute difference of each layer/head's normalised
entropy, summarised by its mean and maximum.

Pure NumPy/torch/SciPy: no Lightning, no wandb.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou

from detlens.explainers.metrics import spearman_per_map
from detlens.focus.record import EntropyPoint, FocusImage, MapPoint

__all__ = [
    "EntropyDrift",
    "ImageDrift",
    "PointDrift",
    "energy_by_class",
    "entropy_drift",
    "focus_metrics",
    "map_similarity",
    "match_between",
    "point_drift",
]


def match_between(
    boxes_a: np.ndarray, labels_a: np.ndarray, boxes_b: np.ndarray, labels_b: np.ndarray, iou_threshold: float = 0.5
) -> list[tuple[int, int]]:
    """One-to-one matching of two detection sets of the same image.

    Args:
        boxes_a: ``float[Ka, 4]`` xyxy; labels_a: ``int[Ka]``; boxes_b, labels_b: likewise ``Kb``.
        iou_threshold: a pair needs this IoU and the same label.

    Returns:
        ``[(i, j), ...]``: index in ``a``, index in ``b``, sorted by ``i``; the assignment
        maximises the summed IoU of the admissible pairs.
    """
    from scipy.optimize import linear_sum_assignment

    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    ba = torch.as_tensor(np.asarray(boxes_a, np.float32).reshape(-1, 4))
    bb = torch.as_tensor(np.asarray(boxes_b, np.float32).reshape(-1, 4))
    if ba.shape[0] == 0 or bb.shape[0] == 0:
        return []
    iou = box_iou(ba, bb).numpy().astype(np.float64)  # [Ka, Kb]
    same = np.asarray(labels_a).reshape(-1, 1) == np.asarray(labels_b).reshape(1, -1)
    admissible = same & (iou >= iou_threshold)
    if not admissible.any():
        return []
    gain = np.where(admissible, iou, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return sorted((int(i), int(j)) for i, j in zip(rows, cols) if admissible[i, j])


def map_similarity(maps_a: np.ndarray, maps_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman ``rho`` and cosine similarity of corresponding maps.

    Args:
        maps_a, maps_b: ``float[K, S, S]`` (same shape), non-negative.

    Returns:
        ``(rho float64[K], cosine float64[K])``. ``rho`` is NaN where a map is constant;
        cosine is 1 for two all-zero maps and 0 when only one is zero.
    """
    a = np.asarray(maps_a, np.float64)
    b = np.asarray(maps_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if a.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    rho = spearman_per_map(torch.from_numpy(a), torch.from_numpy(b)).double().numpy()
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    dot = (fa * fb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where((na > 0) & (nb > 0), dot / (na * nb), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return rho, np.clip(cosine, -1.0, 1.0)


def _pair_drift(rho: np.ndarray, maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    drift = 1.0 - rho
    undefined = ~np.isfinite(rho)
    for i in np.flatnonzero(undefined):
        drift[i] = 0.0 if np.array_equal(np.asarray(maps_a[i]), np.asarray(maps_b[i])) else 1.0
    return drift


@dataclass
class ImageDrift:
    """Drift of one probe image's detections between two points.

    Attributes:
        probe_index: the image; pairs: matched ``(index in a, index in b)``.
        spearman, cosine, drift: ``float64[len(pairs)]`` per matched pair.
        count_a, count_b: detections at each point.
    """

    probe_index: int
    pairs: list[tuple[int, int]]
    spearman: np.ndarray
    cosine: np.ndarray
    drift: np.ndarray
    count_a: int
    count_b: int

    @property
    def mean_drift(self) -> float:
        return float(self.drift.mean()) if len(self.drift) else math.nan


@dataclass
class PointDrift:
    """Drift between two map points over the probe images they share.

    Attributes:
        images: one :class:`ImageDrift` per shared probe image (ascending index).
        drift: mean pair drift (NaN when nothing matched); similarity: mean cosine;
        spearman: mean rho over pairs where it is defined.
        matched: matched pairs; count_a, count_b: detections on the shared images.
        match_rate: ``matched / max(count_a, count_b)`` (NaN when both are empty: nothing
            was there to match, which is not a 100% match).
        missing_images: probe indices present in only one of the points.
    """

    images: list[ImageDrift]
    drift: float
    similarity: float
    spearman: float
    matched: int
    count_a: int
    count_b: int
    match_rate: float
    missing_images: list[int] = field(default_factory=list)

    def pair_drifts(self) -> np.ndarray:
        """``float64[matched]``: the drift of every matched pair (what :attr:`drift` averages)."""
        return np.concatenate([d.drift for d in self.images]) if self.images else np.zeros(0)

    def scalars(self, suffix: str) -> dict[str, float]:
        """``{"drift_<suffix>", "similarity_<suffix>", "match_rate_<suffix>"}``, NaNs left out."""
        values = {f"drift_{suffix}": self.drift, f"similarity_{suffix}": self.similarity, f"match_rate_{suffix}": self.match_rate}
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def image_drift(a: FocusImage, b: FocusImage, iou_threshold: float = 0.5) -> ImageDrift:
    """Matches ``a``'s detections to ``b``'s and compares the matched maps."""
    pairs = match_between(a.boxes, a.labels, b.boxes, b.labels, iou_threshold)
    if pairs:
        ia, ib = (np.array(x) for x in zip(*pairs))
        ma, mb = a.maps[ia].astype(np.float32), b.maps[ib].astype(np.float32)
        if ma.shape != mb.shape:
            raise ValueError(f"probe image {a.probe_index}: stored maps differ in size ({list(ma.shape)} vs {list(mb.shape)})")
        rho, cosine = map_similarity(ma, mb)
        drift = _pair_drift(rho, ma, mb)
    else:
        rho = cosine = drift = np.zeros(0)
    return ImageDrift(a.probe_index, pairs, rho, cosine, drift, len(a), len(b))


def point_drift(a: MapPoint, b: MapPoint, iou_threshold: float = 0.5) -> PointDrift:
    """Drift from point ``a`` to point ``b`` over the probe images both explained."""
    ia = {im.probe_index: im.confident() for im in a.images}
    ib = {im.probe_index: im.confident() for im in b.images}
    shared = sorted(set(ia) & set(ib))
    missing = sorted(set(ia) ^ set(ib))
    images = [image_drift(ia[i], ib[i], iou_threshold) for i in shared]
    drifts = np.concatenate([d.drift for d in images]) if images else np.zeros(0)
    cosines = np.concatenate([d.cosine for d in images]) if images else np.zeros(0)
    rhos = np.concatenate([d.spearman for d in images]) if images else np.zeros(0)
    rhos = rhos[np.isfinite(rhos)]
    count_a = sum(d.count_a for d in images)
    count_b = sum(d.count_b for d in images)
    matched = int(len(drifts))
    most = max(count_a, count_b)
    return PointDrift(
        images=images,
        drift=float(drifts.mean()) if matched else math.nan,
        similarity=float(cosines.mean()) if matched else math.nan,
        spearman=float(rhos.mean()) if len(rhos) else math.nan,
        matched=matched,
        count_a=count_a,
        count_b=count_b,
        match_rate=matched / most if most else math.nan,
        missing_images=missing,
    )


@dataclass
class EntropyDrift:
    """Per layer/head absolute entropy change (``{"<layer>/head<i>": |Hb - Ha|}``) and its mean / max."""

    per_head: dict[str, float]
    mean: float
    max: float

    def scalars(self, suffix: str) -> dict[str, float]:
        values = {f"entropy_drift_{suffix}": self.mean, f"entropy_drift_max_{suffix}": self.max}
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def entropy_drift(a: EntropyPoint, b: EntropyPoint) -> EntropyDrift:
    """Entropy change over the layer/heads both points read."""
    fa, fb = a.flat(), b.flat()
    per_head = {k: abs(fb[k] - fa[k]) for k in fa if k in fb}
    values = np.array(list(per_head.values()), np.float64)
    return EntropyDrift(per_head, float(values.mean()) if len(values) else math.nan, float(values.max()) if len(values) else math.nan)


def energy_by_class(point: MapPoint, class_names: Mapping[int, str] | None = None) -> dict[str, np.ndarray]:
    """Per class name, the energy-in-box of every true positive with a scored map
    (``float64[n]``; flat maps and false positives have NaN in the record and are left out)."""
    names = dict(point.class_names)
    names.update(class_names or {})
    out: dict[str, list[np.ndarray]] = {}
    for im in point.images:
        if not len(im):
            continue
        energy = np.asarray(im.energy_in_box, np.float64)
        keep = np.asarray(im.is_tp, bool) & np.isfinite(energy)
        for label in np.unique(im.labels[keep]):
            out.setdefault(names.get(int(label), str(int(label))), []).append(energy[keep & (im.labels == label)])
    return {k: np.concatenate(v) for k, v in sorted(out.items())}


def focus_metrics(point: MapPoint, class_names: Mapping[int, str] | None = None) -> dict[str, float]:
    """Localisation of one point's maps, over its true positives (as recorded at logging time);
    detections shown below the score threshold are left out of every value.

    Returns:
        ``energy_in_box``, ``energy_in_box_chance``, ``pointing_game`` and per class
        ``energy_in_box/<class>``, ``pointing_game/<class>``; ``true_positive_rate`` and
        ``detections_per_image``. Keys without a value (no true positive) are left out.
    """
    names = dict(point.class_names)
    names.update(class_names or {})
    images: Sequence[FocusImage] = [im.confident() for im in point.images]
    count = sum(len(im) for im in images)
    out: dict[str, float] = {"detections_per_image": count / max(len(images), 1)}
    if not count:
        return out
    is_tp = np.concatenate([im.is_tp for im in images]).astype(bool)
    labels = np.concatenate([im.labels for im in images])
    has_gt = any(len(im.gt_labels) for im in images)
    if has_gt:
        out["true_positive_rate"] = float(is_tp.mean())
    columns = {
        "energy_in_box": np.concatenate([im.energy_in_box for im in images]).astype(np.float64),
        "energy_in_box_chance": np.concatenate([im.chance for im in images]).astype(np.float64),
        "pointing_game": np.concatenate([im.pointing_game for im in images]).astype(np.float64),
    }
    for name, values in columns.items():
        keep = is_tp & np.isfinite(values)
        if keep.any():
            out[name] = float(values[keep].mean())
        if name == "energy_in_box_chance":
            continue
        for label in np.unique(labels[keep]):
            sel = keep & (labels == label)
            out[f"{name}/{names.get(int(label), str(int(label)))}"] = float(values[sel].mean())
    return out
