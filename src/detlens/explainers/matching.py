"""Label each detection of one image true/false positive, and why, against its ground truth.

Matching follows COCO (``pycocotools.cocoeval.COCOeval.evaluateImg``): detections are
visited in descending score order (stable for ties); each takes the unmatched ground-truth
box *of its own class* with the highest IoU, provided that IoU is ``>= iou_threshold``.
Such a detection is a true positive (``"tp"``). Every other detection is a false
positive, and its reason follows the error types of TIDE (Bolya et al., ECCV 2020,
"TIDE: A General Toolbox for Identifying Object Detection Errors"), checked in this order:

``"duplicate"``
    IoU ``>= iou_threshold`` with a same-class GT box that a higher-scoring detection
    already took.
``"wrong_class"``
    no same-class GT box at ``>= iou_threshold``, but a GT box of another class at
    ``>= iou_threshold`` (the box is right, the label is not).
``"localization"``
    the best same-class IoU is in ``[background_threshold, iou_threshold)`` (right class,
    box off).
``"class_and_localization"``
    no same-class GT box at ``>= background_threshold``, and the best IoU with a GT box of
    another class is in ``[background_threshold, iou_threshold)`` (TIDE's "both" error).
``"background"``
    IoU ``< background_threshold`` with every GT box (default 0.1, TIDE's value): the
    detector fired on background. With no GT boxes at all every detection is background.

GT boxes no detection took are the false negatives (``missed_gt``). Every step is a
comparison of ``torchvision.ops.box_iou`` values; nothing here needs gradients.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["FP_REASONS", "OUTCOMES", "MatchResult", "match_detections"]

FP_REASONS: tuple[str, ...] = (
    "duplicate",
    "wrong_class",
    "localization",
    "class_and_localization",
    "background",
)
"""Why a detection is a false positive, in the order the reasons are tested."""

OUTCOMES: tuple[str, ...] = ("tp", *FP_REASONS)
"""Every value of :attr:`MatchResult.outcome`."""


@dataclass(frozen=True)
class MatchResult:
    """Outcome of matching the ``K`` detections of one image to its ``G`` GT boxes.

    All tensors are on the CPU (small, picklable, safe to gather across ranks).

    Attributes:
        outcome: ``K`` strings, per detection in the order given: ``"tp"`` or one of
            :data:`FP_REASONS`.
        matched_gt: ``Int64Tensor[K]``: index of the GT box a true positive took, ``-1``
            for false positives.
        max_iou: ``FloatTensor[K]``: the highest IoU of each detection with any GT box
            (any class, matched or not); ``0`` when there is no GT box.
        missed_gt: ``Int64Tensor[M]``: indices of the GT boxes no detection took (false
            negatives), ascending.
        iou_threshold: the IoU a match needs.
        background_threshold: below this IoU with every GT box a false positive is
            ``"background"``.
    """

    outcome: tuple[str, ...]
    matched_gt: Tensor
    max_iou: Tensor
    missed_gt: Tensor
    iou_threshold: float
    background_threshold: float

    def __len__(self) -> int:
        return len(self.outcome)

    @property
    def is_tp(self) -> Tensor:
        """``BoolTensor[K]``: which detections are true positives."""
        return self.matched_gt >= 0

    @property
    def status(self) -> tuple[str, ...]:
        """``K`` strings, ``"tp"`` or ``"fp"``."""
        return tuple("tp" if o == "tp" else "fp" for o in self.outcome)

    @property
    def fp_reason(self) -> tuple[str | None, ...]:
        """``K`` entries: the false-positive reason, ``None`` for true positives."""
        return tuple(None if o == "tp" else o for o in self.outcome)

    def counts(self) -> dict[str, int]:
        """``{"tp", "fp", "fn", "fp/<reason>" for every reason}``, each an int (zeros included)."""
        per = Counter(self.outcome)
        tp = per.get("tp", 0)
        out = {"tp": tp, "fp": len(self.outcome) - tp, "fn": int(self.missed_gt.numel())}
        out.update({f"fp/{reason}": per.get(reason, 0) for reason in FP_REASONS})
        return out


def _check(name: str, tensor: Tensor, shape_tail: tuple[int, ...], n: int | None = None) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1 + len(shape_tail) or tuple(tensor.shape[1:]) != shape_tail:
        want = "[N" + "".join(f", {s}" for s in shape_tail) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(tensor.shape)}")
    if n is not None and tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {n}")
    return tensor.detach().cpu()


def match_detections(
    pred_boxes: Tensor,
    pred_labels: Tensor,
    pred_scores: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    iou_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> MatchResult:
    """COCO-style greedy matching of one image's detections, with a reason for every FP.

    See the module docstring for the exact rules.

    Args:
        pred_boxes: ``FloatTensor[K, 4]`` detections, ``x1, y1, x2, y2`` pixels.
        pred_labels: ``Int64Tensor[K]`` their class labels.
        pred_scores: ``FloatTensor[K]`` their confidences (only the order matters).
        gt_boxes: ``FloatTensor[G, 4]`` ground-truth boxes, same frame as ``pred_boxes``.
        gt_labels: ``Int64Tensor[G]`` their class labels.
        iou_threshold: IoU a match needs (COCO: ``>=``), in ``(0, 1]``.
        background_threshold: IoU under which a detection is unrelated to a GT box, in
            ``[0, iou_threshold]``.

    Returns:
        A :class:`MatchResult` (CPU tensors). ``K = 0`` and/or ``G = 0`` are valid.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not 0.0 <= background_threshold <= iou_threshold:
        raise ValueError(
            f"background_threshold must be in [0, iou_threshold={iou_threshold}], got {background_threshold}"
        )
    pred_boxes = _check("pred_boxes", pred_boxes, (4,))
    k = pred_boxes.shape[0]
    pred_labels = _check("pred_labels", pred_labels, (), k).long()
    pred_scores = _check("pred_scores", pred_scores, (), k)
    gt_boxes = _check("gt_boxes", gt_boxes, (4,))
    g = gt_boxes.shape[0]
    gt_labels = _check("gt_labels", gt_labels, (), g).long()

    iou = box_iou(pred_boxes.float(), gt_boxes.float())  # [K, G]
    same_class = pred_labels[:, None] == gt_labels[None, :]  # [K, G]
    iou_same = torch.where(same_class, iou, torch.full_like(iou, -1.0))
    iou_other = torch.where(same_class, torch.full_like(iou, -1.0), iou)

    matched_gt = torch.full((k,), -1, dtype=torch.long)
    gt_taken = torch.zeros(g, dtype=torch.bool)
    outcome: list[str] = [""] * k
    order = torch.sort(pred_scores, descending=True, stable=True).indices
    # The greedy loop is inherently sequential (each match changes what later ones may
    # take); K is at most a few hundred per image.
    for d in order.tolist():
        if g:
            free = iou_same[d].masked_fill(gt_taken, -1.0)
            best_iou, best = free.max(0)
            if best_iou >= iou_threshold:
                matched_gt[d] = best
                gt_taken[best] = True
                outcome[d] = "tp"
                continue
        outcome[d] = _fp_reason(
            same=iou_same[d], other=iou_other[d], taken=gt_taken,
            thr=iou_threshold, bg=background_threshold,
        )

    max_iou = iou.max(1).values if g else torch.zeros(k)
    return MatchResult(
        outcome=tuple(outcome),
        matched_gt=matched_gt,
        max_iou=max_iou.float(),
        missed_gt=torch.nonzero(~gt_taken).flatten(),
        iou_threshold=float(iou_threshold),
        background_threshold=float(background_threshold),
    )


def _fp_reason(same: Tensor, other: Tensor, taken: Tensor, thr: float, bg: float) -> str:
    """TIDE's error type of an unmatched detection, from its IoU rows ``[G]`` (-1 = n/a)."""
    if same.numel() == 0:
        return "background"
    if bool(((same >= thr) & taken).any()):
        return "duplicate"
    best_other = float(other.max())
    if best_other >= thr:
        return "wrong_class"
    if float(same.max()) >= bg:
        return "localization"
    if best_other >= bg:
        return "class_and_localization"
    return "background"
