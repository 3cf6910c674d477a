"""Decision boundary of each detection: the smallest perturbation (found by a bounded attack) that removes it.

For every detection ``d`` (box ``b_d``, class ``c_d``) of an image ``x``, a projected
gradient attack looks for a perturbation ``delta`` that makes the detector *lose* ``d``:

    lost(x + delta)  <=>  no detection of class ``c_d`` with IoU(box, b_d) >= ``iou_threshold``
                          scores above ``score_threshold`` on ``x + delta``

(a detection whose class changed is lost the same way: its class is gone from the box;
the class that took its place, if any, is reported as ``flipped_to``).

The attack descends the detection's own differentiable score: on every step, the
objective of detection ``d`` is the highest ``score_graph`` among the detections of
``x + delta`` that still count as ``d`` (same class, IoU >= ``iou_threshold`` with
``b_d``); at ``delta = 0`` that is ``d`` itself. The step is the sign of the gradient
(``norm="linf"``) or the gradient scaled to unit L2 norm (``norm="l2"``), of fixed size
``step_size``; after each step ``delta`` is projected onto the ball of radius ``epsilon``
and ``x + delta`` clipped to ``[0, 1]``. The attack starts at ``delta = 0`` (no random
start), so it is deterministic and a run with fewer ``steps`` is exactly the first part
of a run with more: a smaller step budget can only turn a loss into "not lost".

**Margin.** The norm of ``delta`` at the first step where ``d`` is lost: ``max |delta|``
(``linf``) or the root-mean-square of ``delta`` over all pixels and channels (``l2``, i.e.
``||delta||_2 / sqrt(3 H W)``, in the same units as ``linf``: intensities in ``[0, 1]``,
independent of the image size). It is an upper bound on the distance to the decision
boundary found by this attack, not the exact distance. A detection not lost within the
budget has ``lost = False`` and ``margin = NaN``: the budget was too small to say.

**Verification.** Every loss is confirmed by re-running the detector (the adapter, eval
mode) on that detection's perturbed image alone; a loss seen in the batched attack
forward but not confirmed is not reported, and the attack goes on from there.

**Batching.** The detections of all images are attacked together: one perturbed copy of
its image per detection, same-sized copies stacked through the adapter in one forward
(at most ``batch_size`` per forward), one backward of the summed objectives. In eval mode
the copies do not interact (BatchNorm uses running statistics, the detector treats each
image on its own), so each copy's gradient is exactly its own detection's gradient:
the batched attack equals the one-attack-per-detection loop (``batched=False``, the
reference) up to floating-point reordering.

No Lightning, no wandb, no global RNG (there is no randomness).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from detlens.adapters.base import Detections, DetectorAdapter

__all__ = ["DEFAULT_EPSILON", "BoundaryResult", "Norm", "boundary", "default_step_size", "per_class_summary"]

Norm = Literal["l2", "linf"]

DEFAULT_EPSILON: dict[str, float] = {"linf": 0.1, "l2": 0.05}
"""Default budgets (intensities in ``[0, 1]``: ``max |delta|`` for ``linf``, RMS of ``delta`` for ``l2``)."""


def default_step_size(epsilon: float) -> float:
    """``epsilon / 10``: the ball's edge is reached in ten steps (independent of ``steps``,
    so a shorter run is a prefix of a longer one)."""
    return float(epsilon) / 10.0


@dataclass(frozen=True)
class BoundaryResult:
    """The boundary of the ``K`` detections of one image (CPU tensors).

    Attributes:
        boxes: ``FloatTensor[K, 4]`` xyxy pixels; scores: ``FloatTensor[K]``; labels: ``Int64Tensor[K]``:
            the attacked detections.
        margin: ``FloatTensor[K]``: norm of the perturbation at which the detection was lost
            (>= 0, finite), ``NaN`` when it was not lost within the budget.
        lost: ``BoolTensor[K]``: lost within the budget (verified on the perturbed image).
        flipped_to: ``Int64Tensor[K]``: the label of the best other-class detection at
            IoU >= ``iou_threshold`` on the perturbed image, ``-1`` when none (or not lost).
        lost_at_step: ``Int64Tensor[K]``: the attack step of the loss (0 = unperturbed), ``-1`` when not lost.
        delta_map: ``FloatTensor[K, H, W]``: ``|delta|`` summed over the colour channels, at
            image resolution: the perturbation at the loss, or at the end of the budget.
        perturbed: ``FloatTensor[K, 3, H, W]``: the image the loss was verified on (``x + delta``
            in ``[0, 1]``); for a detection not lost, ``x`` plus the final perturbation.
        norm, epsilon, step_size, steps, score_threshold, iou_threshold: the attack's settings.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    margin: Tensor
    lost: Tensor
    flipped_to: Tensor
    lost_at_step: Tensor
    delta_map: Tensor
    perturbed: Tensor
    norm: str
    epsilon: float
    step_size: float
    steps: int
    score_threshold: float
    iou_threshold: float

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class _Row:
    """One attacked detection (internal)."""

    image: int
    det: int
    box: Tensor  # [4], original-image pixels
    label: int
    x: Tensor  # [3, H, W] the clean image
    delta: Tensor  # [3, H, W]
    done: bool = False
    margin: float = math.nan
    flipped_to: int = -1
    step: int = -1


def _check_args(norm: str, epsilon: float, step_size: float, steps: int, score_threshold: float,
                iou_threshold: float, batch_size: int) -> None:
    if norm not in get_args(Norm):
        raise ValueError(f"norm must be one of {list(get_args(Norm))}, got {norm!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not 0.0 < score_threshold < 1.0:
        raise ValueError(
            f"score_threshold must be in (0, 1), got {score_threshold!r}: it is the score below which a detection "
            "counts as lost, so 0 would make nothing ever lost"
        )
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _norm_of(delta: Tensor, norm: str) -> float:
    d = delta.detach().double()
    if norm == "linf":
        return float(d.abs().max()) if d.numel() else 0.0
    return float(d.pow(2).mean().sqrt()) if d.numel() else 0.0


def _matches(found: Detections, box: Tensor, label: int, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """``(same, other)``: BoolTensor[M] of found detections at IoU >= threshold with ``box``,
    of the same class / of another class."""
    if len(found) == 0:
        empty = torch.zeros(0, dtype=torch.bool)
        return empty, empty
    iou = box_iou(found.boxes.detach().float().cpu(), box.float().cpu()[None])[:, 0]
    near = iou >= iou_threshold
    same = found.labels.detach().cpu() == int(label)
    return near & same, near & ~same


def _flipped(found: Detections, box: Tensor, label: int, iou_threshold: float) -> int:
    _, other = _matches(found, box, label, iou_threshold)
    if not bool(other.any()):
        return -1
    scores = found.scores.detach().float().cpu().masked_fill(~other, -math.inf)
    return int(found.labels[int(scores.argmax())])


def _objectives(adapter: DetectorAdapter, rows: list[_Row], score_threshold: float, iou_threshold: float):
    """One adapter forward over the rows' perturbed images.

    Returns ``(output, objective per row or None when the row's detection is not found)``.
    """
    perturbed = [(r.x + r.delta).clamp(0, 1) for r in rows]
    output = adapter.run(perturbed, top_k=None, score_threshold=score_threshold, with_grad=True)
    objectives: list[Tensor | None] = []
    for r, found in zip(rows, output.detections):
        same, _ = _matches(found, r.box, r.label, iou_threshold)
        if not bool(same.any()):
            objectives.append(None)
            continue
        idx = torch.nonzero(same).flatten().to(found.score_graph.device)
        objectives.append(found.score_graph[idx].float().max())
    return output, objectives


def _step(rows: list[_Row], grads: list[Tensor], norm: str, epsilon: float, step_size: float) -> None:
    """Descends each row's objective by one projected step (in place on ``row.delta``)."""
    for r, g in zip(rows, grads):
        g = g.detach().float()
        if norm == "linf":
            delta = r.delta - step_size * g.sign()
            delta = delta.clamp(-epsilon, epsilon)
        else:
            # RMS units: a step of size s moves delta by s * sqrt(n) in plain L2.
            scale = math.sqrt(g.numel())
            gnorm = float(g.double().norm())
            delta = r.delta - (step_size * scale / gnorm) * g if gnorm > 0 else r.delta
            dnorm = float(delta.double().norm()) / scale
            if dnorm > epsilon:
                delta = delta * (epsilon / dnorm)
        r.delta = (r.x + delta).clamp(0, 1) - r.x


def _verify(adapter: DetectorAdapter, row: _Row, score_threshold: float, iou_threshold: float) -> tuple[bool, int]:
    """Re-runs the detector on the row's perturbed image alone: ``(lost, flipped_to)``."""
    image = (row.x + row.delta).clamp(0, 1)
    found = adapter.run([image], top_k=None, score_threshold=score_threshold, with_grad=False).detections[0]
    same, _ = _matches(found, row.box, row.label, iou_threshold)
    if bool(same.any()):
        return False, -1
    return True, _flipped(found, row.box, row.label, iou_threshold)


def _attack(adapter: DetectorAdapter, rows: list[_Row], norm: str, epsilon: float, step_size: float, steps: int,
            score_threshold: float, iou_threshold: float, batch_size: int) -> None:
    """Attacks ``rows`` together (forwards of at most ``batch_size`` same-sized copies)."""
    for t in range(steps + 1):
        active = [r for r in rows if not r.done]
        if not active:
            return
        groups: dict[tuple[int, ...], list[_Row]] = {}
        for r in active:
            groups.setdefault(tuple(r.x.shape), []).append(r)
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                output, objectives = _objectives(adapter, chunk, score_threshold, iou_threshold)
                # candidates: not found in the batched forward -> confirm on the image alone
                for r, obj in zip(chunk, objectives):
                    if obj is None:
                        lost, flipped = _verify(adapter, r, score_threshold, iou_threshold)
                        if lost:
                            r.done, r.margin, r.flipped_to, r.step = True, _norm_of(r.delta, norm), flipped, t
                if t == steps:
                    continue
                todo = [(k, r, obj) for k, (r, obj) in enumerate(zip(chunk, objectives)) if not r.done]
                with_obj = [(k, r, obj) for k, r, obj in todo if obj is not None]
                grads: dict[int, Tensor] = {}
                if with_obj:
                    total = torch.stack([obj for _, _, obj in with_obj]).sum()
                    leaves = [output.inputs[k] for k, _, _ in with_obj]
                    got = torch.autograd.grad(total, leaves, allow_unused=True)
                    grads = {k: (g if g is not None else torch.zeros_like(leaves[j]))
                             for j, ((k, _, _), g) in enumerate(zip(with_obj, got))}
                for k, r, obj in todo:
                    if obj is None:  # not confirmed lost: its gradient from its own forward
                        single, (own,) = _objectives(adapter, [r], score_threshold, iou_threshold)
                        if own is None:  # lost alone after all: the next step confirms it
                            continue
                        (g,) = torch.autograd.grad(own, [single.inputs[0]], allow_unused=True)
                        grads[k] = g if g is not None else torch.zeros_like(r.x)
                    _step([r], [grads[k]], norm, epsilon, step_size)
                del output, objectives


def boundary(
    adapter: DetectorAdapter,
    images: Sequence[Tensor],
    detections: Sequence[Detections],
    *,
    norm: Norm = "l2",
    epsilon: float | None = None,
    step_size: float | None = None,
    steps: int = 20,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    batch_size: int = 32,
    batched: bool = True,
) -> list[BoundaryResult]:
    """The decision boundary of the given detections (see the module docstring).

    Args:
        adapter: runs the detector (eval mode, restored after).
        images: ``B`` images ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        detections: the detections of each image to attack (e.g. an adapter run's,
            those scoring above ``score_threshold``).
        norm: ``"l2"`` (margin = RMS of the perturbation) or ``"linf"`` (max |delta|).
        epsilon: the budget, the ball's radius in the norm's units (default
            :data:`DEFAULT_EPSILON`); step_size: each step's length (default ``epsilon / 10``).
        steps: gradient steps per detection (the step budget); ``steps + 1`` forwards check for a loss.
        score_threshold: a detection scoring at or below it is lost (in ``(0, 1)``).
        iou_threshold: IoU with the original box at which a same-class detection still counts as it.
        batch_size: most perturbed copies per forward (memory bound; exact at any value).
        batched: ``False`` runs one full attack per detection (the reference loop).

    Returns:
        One :class:`BoundaryResult` per image.
    """
    if epsilon is None:
        epsilon = DEFAULT_EPSILON.get(norm, 0.05)
    if step_size is None:
        step_size = default_step_size(epsilon)
    _check_args(norm, epsilon, step_size, steps, score_threshold, iou_threshold, batch_size)
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images for {len(detections)} detection sets")
    with torch.inference_mode(False), torch.enable_grad():
        xs = [im.detach().clone().float() for im in images]  # normal tensors even under inference mode
        for i, x in enumerate(xs):
            if x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(f"image {i} must be FloatTensor[3, H, W], got {list(x.shape)}")
        rows = [
            _Row(image=i, det=d, box=det.boxes[d].detach().float().cpu(), label=int(det.labels[d]), x=xs[i],
                 delta=torch.zeros_like(xs[i]))
            for i, det in enumerate(detections) for d in range(len(det))
        ]
        if batched:
            _attack(adapter, rows, norm, epsilon, step_size, steps, score_threshold, iou_threshold, batch_size)
        else:
            for r in rows:
                _attack(adapter, [r], norm, epsilon, step_size, steps, score_threshold, iou_threshold, 1)
    results = []
    for i, (x, det) in enumerate(zip(xs, detections)):
        mine = [r for r in rows if r.image == i]
        k = len(mine)
        H, W = x.shape[-2:]
        deltas = torch.stack([r.delta for r in mine]) if k else x.new_zeros((0, 3, H, W))
        results.append(BoundaryResult(
            boxes=det.boxes.detach().float().cpu().reshape(-1, 4),
            scores=det.scores.detach().float().cpu().reshape(-1),
            labels=det.labels.detach().long().cpu().reshape(-1),
            margin=torch.tensor([r.margin for r in mine], dtype=torch.float32),
            lost=torch.tensor([r.done for r in mine], dtype=torch.bool),
            flipped_to=torch.tensor([r.flipped_to for r in mine], dtype=torch.long),
            lost_at_step=torch.tensor([r.step for r in mine], dtype=torch.long),
            delta_map=deltas.detach().abs().sum(1).float().cpu(),
            perturbed=(x[None] + deltas).clamp(0, 1).detach().float().cpu(),
            norm=norm, epsilon=float(epsilon), step_size=float(step_size), steps=int(steps),
            score_threshold=float(score_threshold), iou_threshold=float(iou_threshold),
        ))
    return results


def per_class_summary(results: Sequence[BoundaryResult], class_names: dict[int, str] | None = None) -> dict[str, float]:
    """Per class (and over all): the median margin of the lost detections and the share not lost.

    Returns:
        ``{"margin_median", "not_lost_share", "margin_median/<class>", "not_lost_share/<class>",
        "detections"}``; a median is left out when no detection of the class was lost.
    """
    margins = torch.cat([r.margin for r in results]) if results else torch.zeros(0)
    labels = torch.cat([r.labels for r in results]) if results else torch.zeros(0, dtype=torch.long)
    out: dict[str, float] = {"detections": float(len(margins))}
    if not len(margins):
        return out

    def add(suffix: str, m: Tensor) -> None:
        lost = torch.isfinite(m)
        out["not_lost_share" + suffix] = float((~lost).float().mean())
        if bool(lost.any()):
            out["margin_median" + suffix] = float(np.median(m[lost].double().numpy()))

    add("", margins)
    for label in sorted(set(labels.tolist())):
        name = (class_names or {}).get(int(label), str(int(label)))
        add(f"/{name}", margins[labels == label])
    return out
