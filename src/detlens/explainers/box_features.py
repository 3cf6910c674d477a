"""The feature vector behind each detection, with its class, score and TP/FP status.

What a detector "thinks" an object is lives in the vector its classifier read for that
box. The adapters (:mod:`detlens.adapters`) already track, through their own re-run of
the detector's post-processing, which proposal / anchor / query every kept detection
came from, and return that vector in :attr:`detlens.adapters.Detections.features`:

* two-stage (Faster R-CNN): the box head's representation (``roi_heads.box_head``
  output, ``[K, representation_size]``) of the detection's proposal;
* DETR: the last decoder layer's (normed) output embedding of the detection's query;
* one-stage (RetinaNet / FCOS / SSD): the head's input feature (FPN level) at the
  detection's anchor location, on the level the anchor belongs to.

This module runs the adapter once without gradients, matches the detections to the
image's ground truth (:func:`detlens.explainers.matching.match_detections`) and returns
small CPU records that are cheap to gather across DDP ranks.
:func:`concat_box_features` flattens a list of them into one table of detections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detlens.adapters import Detections, DetectorAdapter, adapter_for
from detlens.adapters.base import filter_detections
from detlens.explainers.matching import FP_REASONS, match_detections

__all__ = [
    "BoxFeatureSet", "ImageBoxFeatures", "concat_box_features", "extract_box_features", "image_box_features",
]


@dataclass(frozen=True)
class ImageBoxFeatures:
    """The ``K`` kept detections of one image, their feature vectors and TP/FP outcome.

    All tensors are on the CPU, detached, float32 / int64.

    Attributes:
        image_id: the dataset's ``image_id`` (``-1`` when the target had none).
        boxes: ``FloatTensor[K, 4]`` ``x1, y1, x2, y2`` in input-image pixels.
        scores: ``FloatTensor[K]``, descending.
        labels: ``Int64Tensor[K]`` class labels (``1..C``).
        features: ``FloatTensor[K, D]`` the vector behind each box (see module docstring).
        origin: ``Int64Tensor[K]`` proposal / anchor / query index of each detection.
        level: ``K`` feature-level names (``""`` where not applicable).
        outcome: ``K`` strings, ``"tp"`` or a false-positive reason of
            :data:`detlens.explainers.matching.FP_REASONS`; ``None`` without ground truth.
        matched_gt: ``Int64Tensor[K]`` index of the GT box a TP took, ``-1`` otherwise
            (``None`` without ground truth).
        missed_boxes: ``FloatTensor[M, 4]`` GT boxes no detection took (false negatives).
        missed_labels: ``Int64Tensor[M]`` their labels.
        family: the adapter family (``"two_stage"``, ``"one_stage"``, ``"detr"``, ...).
    """

    image_id: int
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    features: Tensor
    origin: Tensor
    level: tuple[str, ...]
    outcome: tuple[str, ...] | None
    matched_gt: Tensor | None
    missed_boxes: Tensor
    missed_labels: Tensor
    family: str

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass(frozen=True)
class BoxFeatureSet:
    """Detections of many images as one table, ``N`` rows (see :func:`concat_box_features`).

    Attributes:
        features: ``FloatTensor[N, D]``.
        labels: ``Int64Tensor[N]``.
        scores: ``FloatTensor[N]``.
        boxes: ``FloatTensor[N, 4]`` in the pixels of their own image.
        outcome: ``N`` strings (``"tp"``, an FP reason, or ``"unknown"`` without ground truth).
        image_id: ``Int64Tensor[N]`` dataset image id of each row.
        source: ``Int64Tensor[N]`` position of each row's image in the input list (or the
            key given for it, e.g. the probe-dataset index).
        false_negatives: number of GT boxes no detection took, over all images.
        false_negatives_per_class: ``{label: count}`` of those.
    """

    features: Tensor
    labels: Tensor
    scores: Tensor
    boxes: Tensor
    outcome: tuple[str, ...]
    image_id: Tensor
    source: Tensor
    false_negatives: int
    false_negatives_per_class: dict[int, int]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def status(self) -> tuple[str, ...]:
        """``N`` strings: ``"tp"``, ``"fp"`` or ``"unknown"``."""
        return tuple(o if o in ("tp", "unknown") else "fp" for o in self.outcome)

    def counts(self) -> dict[str, int]:
        """``{"detections", "tp", "fp", "fn", "fp/<reason>" ...}`` over all rows (ints)."""
        out = {"detections": len(self), "tp": self.outcome.count("tp"), "fn": self.false_negatives}
        out["fp"] = sum(o in FP_REASONS for o in self.outcome)
        out.update({f"fp/{r}": self.outcome.count(r) for r in FP_REASONS})
        return out


def _image_id(target: Mapping[str, Any] | None) -> int:
    value = None if target is None else target.get("image_id")
    if isinstance(value, Tensor):
        value = value.item()
    return -1 if value is None else int(value)


@torch.no_grad()
def extract_box_features(
    model: nn.Module | DetectorAdapter,
    images: Sequence[Tensor] | Tensor,
    targets: Sequence[Mapping[str, Any]] | None = None,
    *,
    score_threshold: float = 0.3,
    max_detections: int | None = 50,
    iou_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> list[ImageBoxFeatures]:
    """Per image: kept detections, the feature vector behind each, and TP/FP/FN status.

    One forward of the detector (eval mode, no gradients; the model's flags are restored
    by the adapter), through :func:`detlens.adapters.adapter_for` (a LightningModule's
    ``.model`` is unwrapped) or the adapter given.

    Args:
        model: a torchvision detector, detlens' DETR, a LightningModule holding one, or a
            :class:`~detlens.adapters.DetectorAdapter`.
        images: ``B`` images ``FloatTensor[3, H, W]`` in ``[0, 1]`` (or ``[B, 3, H, W]``).
        targets: ``B`` targets (``boxes [G, 4]`` xyxy pixels, ``labels [G]``, optional
            ``image_id``) as in ``detlens.data``; ``None``: no matching (``outcome`` is None).
        score_threshold: keep detections scoring above this.
        max_detections: keep at most this many per image (highest scores); ``None``: all.
        iou_threshold, background_threshold: see :func:`~detlens.explainers.matching.match_detections`.

    Returns:
        ``B`` :class:`ImageBoxFeatures`, in the order of ``images``.
    """
    adapter = model if isinstance(model, DetectorAdapter) else adapter_for(model)
    batch = list(images.unbind(0)) if isinstance(images, Tensor) and images.dim() == 4 else images
    if targets is not None and len(targets) != len(batch):
        raise ValueError(f"got {len(targets)} targets for {len(batch)} images")
    output = adapter.run(batch, top_k=max_detections, score_threshold=score_threshold, with_grad=False)
    return [
        image_box_features(
            det, None if targets is None else targets[i], output.family,
            iou_threshold=iou_threshold, background_threshold=background_threshold,
        )
        for i, det in enumerate(output.detections)
    ]


@torch.no_grad()
def image_box_features(
    det: Detections,
    target: Mapping[str, Any] | None,
    family: str,
    *,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    iou_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> ImageBoxFeatures:
    """One image's :class:`ImageBoxFeatures` from an adapter's :class:`~detlens.adapters.Detections`.

    For detections that come from elsewhere than :func:`extract_box_features` — e.g. read
    from the validation loop's own forward (:class:`detlens.adapters.observe.ForwardObserver`).

    Args:
        det: the image's detections with ``features`` (boxes in the image's pixels).
        target: its ground truth (``boxes``, ``labels``, optional ``image_id``), or ``None``.
        family: the adapter family.
        score_threshold, max_detections: keep the detections scoring above the threshold,
            at most this many (highest scores); ``None``: as given.
        iou_threshold, background_threshold: see :func:`~detlens.explainers.matching.match_detections`.
    """
    if score_threshold is not None or max_detections is not None:
        det = filter_detections(det, max_detections, -float("inf") if score_threshold is None else score_threshold)
    boxes, scores = det.boxes.detach().float().cpu(), det.scores.detach().float().cpu()
    labels = det.labels.detach().long().cpu()
    outcome = matched = None
    missed_boxes, missed_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    if target is not None and "boxes" in target:
        gt_boxes = target["boxes"].detach().float().cpu().reshape(-1, 4)
        gt_labels = target["labels"].detach().long().cpu().reshape(-1)
        match = match_detections(
            boxes, labels, scores, gt_boxes, gt_labels,
            iou_threshold=iou_threshold, background_threshold=background_threshold,
        )
        outcome, matched = match.outcome, match.matched_gt
        missed_boxes, missed_labels = gt_boxes[match.missed_gt], gt_labels[match.missed_gt]
    return ImageBoxFeatures(
        image_id=_image_id(target),
        boxes=boxes,
        scores=scores,
        labels=labels,
        # bf16/fp16 under mixed precision: float32 for the projection maths
        features=det.features.detach().float().cpu(),
        origin=det.origin.detach().long().cpu(),
        level=tuple(det.level),
        outcome=outcome,
        matched_gt=matched,
        missed_boxes=missed_boxes,
        missed_labels=missed_labels,
        family=family,
    )


def concat_box_features(
    per_image: Sequence[ImageBoxFeatures], sources: Sequence[int] | None = None
) -> BoxFeatureSet:
    """Stack the detections of several images into one :class:`BoxFeatureSet`.

    Args:
        per_image: results of :func:`extract_box_features` (possibly gathered from
            several ranks).
        sources: one key per image stored in :attr:`BoxFeatureSet.source` (e.g. the
            probe-dataset index); defaults to the position in ``per_image``.

    Raises:
        ValueError: images whose feature widths differ (two different models mixed).
    """
    if sources is not None and len(sources) != len(per_image):
        raise ValueError(f"got {len(sources)} sources for {len(per_image)} images")
    keys = list(range(len(per_image))) if sources is None else [int(s) for s in sources]
    widths = {int(r.features.shape[1]) for r in per_image if len(r)}
    if len(widths) > 1:
        raise ValueError(f"feature widths differ between images: {sorted(widths)}")
    width = widths.pop() if widths else (int(per_image[0].features.shape[1]) if per_image else 0)
    fn: dict[int, int] = {}
    outcome: list[str] = []
    for r in per_image:
        outcome.extend(r.outcome if r.outcome is not None else ("unknown",) * len(r))
        for label in r.missed_labels.tolist():
            fn[int(label)] = fn.get(int(label), 0) + 1

    def cat(tensors: list[Tensor], empty: Tensor) -> Tensor:
        return torch.cat(tensors) if tensors else empty

    return BoxFeatureSet(
        features=cat([r.features.reshape(len(r), width) for r in per_image], torch.zeros(0, width)),
        labels=cat([r.labels for r in per_image], torch.zeros(0, dtype=torch.long)),
        scores=cat([r.scores for r in per_image], torch.zeros(0)),
        boxes=cat([r.boxes for r in per_image], torch.zeros(0, 4)),
        outcome=tuple(outcome),
        image_id=cat([torch.full((len(r),), r.image_id, dtype=torch.long) for r in per_image],
                     torch.zeros(0, dtype=torch.long)),
        source=cat([torch.full((len(r),), k, dtype=torch.long) for r, k in zip(per_image, keys)],
                   torch.zeros(0, dtype=torch.long)),
        false_negatives=sum(fn.values()),
        false_negatives_per_class=dict(sorted(fn.items())),
    )
