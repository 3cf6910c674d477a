"""Compare two focus records (a baseline and a candidate), and a record's focus over training.

Used by ``detlens compare`` / ``detlens report`` and by
:class:`~detlens.callbacks.focus.FocusRegressionCallback` (through :mod:`detlens.focus.drift`).

The comparison takes each record's **last** map point of one ``log_key`` (by default the
first map source in the baseline, e.g. ``"gradcam"``) — the trained model's focus — and
its last attention-entropy reading, and gates two metrics (:func:`gate_checks`), each a
mean over detections with its count and a 95% bootstrap interval
(:mod:`detlens.focus.evidence`):

* ``max_drift``: the candidate's map drift from the baseline (mean ``1 - Spearman rho``
  over matched detections, :func:`detlens.focus.drift.point_drift`);
* ``min_energy_in_box``: each class's mean energy-in-box over the candidate's true
  positives;
* ``max_margin_drop``: the mean drop of the decision-boundary margin
  (``BoundaryCallback``, :func:`margin_drops`) from the baseline to the candidate over
  detections matched between the two records' last boundary points (at least
  ``min_matched`` of them).

The verdict is ``"fail"`` only when an interval lies beyond its threshold, and ``"not
enough evidence"`` (``"insufficient"``) when there are too few detections (fewer than
``min_matched`` matched, fewer than ``min_class_count`` true positives of a class, none
at all), a record has no map entries, or a mean beyond its threshold has an interval
that reaches back across it. A comparison never passes on nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from detlens.focus.drift import EntropyDrift, PointDrift, energy_by_class, entropy_drift, focus_metrics, point_drift
from detlens.focus.evidence import MIN_CLASS_COUNT, MIN_MATCHED, Check, Verdict, judge, overall_verdict, require_min_count
from detlens.focus.record import BoundaryPoint, FocusRecord, FocusRecordError, MapPoint, read_focus_record

__all__ = [
    "Comparison", "TrainingCurves", "compare_records", "gate_checks", "load_record", "margin_check", "margin_drops",
    "training_curves",
]


def load_record(path: str | Path) -> FocusRecord:
    """A focus record from a W&B run folder, a ``detlens_focus`` folder or a ``focus.jsonl`` file."""
    return read_focus_record(path)


def gate_checks(
    drift: PointDrift | None,
    point: MapPoint | None,
    class_names: Mapping[int, str] | None = None,
    *,
    max_drift: float | None,
    min_energy_in_box: float | None,
    min_matched: int = MIN_MATCHED,
    min_class_count: int = MIN_CLASS_COUNT,
    what: str = "baseline",
) -> list[Check]:
    """The gated metrics of a candidate point, each with its count, interval and verdict
    (:mod:`detlens.focus.evidence`).

    Args:
        drift: map drift of the candidate from ``what`` (``None``: not compared).
        point: the candidate's map point (its true positives' energy-in-box), or ``None``.
        max_drift: largest allowed mean drift over matched detections (``None``: not gated);
            fewer than ``min_matched`` matched detections is not enough evidence.
        min_energy_in_box: smallest allowed mean energy-in-box per class (``None``: not
            gated); a class with fewer than ``min_class_count`` scored true positives, or a
            candidate with none at all, is not enough evidence.
    """
    checks: list[Check] = []
    if max_drift is not None and drift is not None:
        name = f"focus drift from the {what}"
        if not drift.images:
            checks.append(Check(name, math.nan, math.nan, math.nan, 0, min_matched, max_drift, "max", "insufficient",
                                f"{name}: no probe image was explained in both records, nothing to compare"))
        else:
            check = judge(name, drift.pair_drifts(), threshold=max_drift, bound="max", min_count=min_matched,
                          unit="matched detections", param="max_drift")
            if check.verdict == "insufficient" and check.count < min_matched:
                check = replace(check, reason=check.reason + f"; {drift.count_a} vs {drift.count_b} detections on "
                                f"{len(drift.images)} shared probe images")
            checks.append(check)
    if min_energy_in_box is not None and point is not None:
        per_class = energy_by_class(point, class_names)
        if not per_class:
            checks.append(Check("energy_in_box", math.nan, math.nan, math.nan, 0, min_class_count, min_energy_in_box, "min",
                                "insufficient", f"no true positive with a map on the probe set at step {point.step}: "
                                "energy-in-box cannot be checked"))
        for cls, values in per_class.items():
            checks.append(judge(f"energy_in_box/{cls}", values, threshold=min_energy_in_box, bound="min",
                                min_count=min_class_count, unit="true positives", param="min_energy_in_box"))
    return checks


def margin_drops(a: BoundaryPoint, b: BoundaryPoint, iou_threshold: float = 0.5) -> np.ndarray:
    """Per detection matched between two boundary points: baseline margin minus candidate margin.

    Detections are matched per shared probe image, same class, IoU >= ``iou_threshold``,
    greedily by the candidate's score (:func:`detlens.explainers.matching.match_detections`
    with the baseline's detections as the reference). A detection not lost within the
    budget counts with the smaller of the two points' budgets (``epsilon``), the least its
    margin can be; two such detections give a drop of 0.

    Returns:
        ``float64[M]`` (positive: the candidate is lost by a smaller perturbation).
    """
    import torch

    from detlens.explainers.matching import match_detections

    if a.norm != b.norm:
        raise ValueError(f"the boundary points use different norms ({a.norm!r} vs {b.norm!r}); margins do not compare")
    cap = min(a.epsilon, b.epsilon)
    drops: list[float] = []
    base = {im.probe_index: im for im in a.images}
    for im in b.images:
        ref = base.get(im.probe_index)
        if ref is None or not len(im) or not len(ref):
            continue
        match = match_detections(torch.as_tensor(im.boxes).float(), torch.as_tensor(im.labels).long(),
                                 torch.as_tensor(im.scores).float(), torch.as_tensor(ref.boxes).float(),
                                 torch.as_tensor(ref.labels).long(), iou_threshold=iou_threshold)
        for k, j in enumerate(match.matched_gt.tolist()):
            if j < 0:
                continue
            mb = float(ref.margins[j]) if np.isfinite(ref.margins[j]) else cap
            mc = float(im.margins[k]) if np.isfinite(im.margins[k]) else cap
            drops.append(min(mb, cap) - min(mc, cap))
    return np.asarray(drops, np.float64)


def margin_check(a: BoundaryPoint | None, b: BoundaryPoint | None, *, max_margin_drop: float, min_matched: int = MIN_MATCHED,
                 iou_threshold: float = 0.5, what: str = "baseline") -> Check:
    """The verdict on the mean margin drop from ``a`` (baseline) to ``b`` (candidate)."""
    name = f"margin drop from the {what}"
    if a is None or b is None:
        missing = "baseline" if a is None else "candidate"
        return Check(name, math.nan, math.nan, math.nan, 0, min_matched, max_margin_drop, "max", "insufficient",
                     f"{name}: the {missing} has no boundary entries (BoundaryCallback), nothing to compare")
    return judge(name, margin_drops(a, b, iou_threshold), threshold=max_margin_drop, bound="max", min_count=min_matched,
                 unit="matched detections", param="max_margin_drop")


@dataclass
class Comparison:
    """A baseline and a candidate record compared at their last points.

    Attributes:
        baseline, candidate: the records; log_key: the map source compared.
        point_a, point_b: the compared map points (``None`` if a record has none).
        drift: map drift from baseline to candidate; entropy: attention-entropy drift
            (``None`` without entropy in both).
        temperatures: learnable attention temperatures at the compared entropy readings,
            ``{block: (baseline T, candidate T)}`` (NaN where a record has none for the block).
        metrics_a, metrics_b: :func:`~detlens.focus.drift.focus_metrics` of each point.
        checks: every gated metric with its count, interval and verdict.
        notes: reasons for "not enough evidence" that are not a metric (a record without
            map entries).
        thresholds: ``{"max_drift", "min_energy_in_box", "max_margin_drop", "min_matched", "min_class_count"}``.
        boundary_a, boundary_b: each record's last boundary point (``None`` without one).
    """

    baseline: FocusRecord
    candidate: FocusRecord
    log_key: str
    point_a: MapPoint | None
    point_b: MapPoint | None
    drift: PointDrift | None
    entropy: EntropyDrift | None
    metrics_a: dict[str, float]
    metrics_b: dict[str, float]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    temperatures: dict[str, tuple[float, float]] = field(default_factory=dict)
    boundary_a: BoundaryPoint | None = None
    boundary_b: BoundaryPoint | None = None

    @property
    def verdict(self) -> Verdict:
        """``"pass"``, ``"fail"`` or ``"insufficient"`` (:func:`~detlens.focus.evidence.overall_verdict`)."""
        return overall_verdict(self.checks, ["insufficient"] * bool(self.notes))

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def violations(self) -> list[str]:
        """The thresholds the evidence says were crossed."""
        return [c.reason for c in self.checks if c.verdict == "fail"]

    @property
    def insufficient(self) -> list[str]:
        """Why the evidence is not enough for a verdict (empty when it is)."""
        return self.notes + [c.reason for c in self.checks if c.verdict == "insufficient"]


def compare_records(
    baseline: FocusRecord,
    candidate: FocusRecord,
    *,
    log_key: str | None = None,
    max_drift: float | None = 0.5,
    min_energy_in_box: float | None = None,
    iou_threshold: float = 0.5,
    min_matched: int = MIN_MATCHED,
    min_class_count: int = MIN_CLASS_COUNT,
    max_margin_drop: float | None = None,
    boundary_key: str | None = None,
) -> Comparison:
    """Compares the candidate's last logging point with the baseline's.

    ``max_margin_drop`` (``None``: not gated) gates the mean margin drop of the last
    boundary points of ``boundary_key`` (``None``: the first in the record).

    Raises:
        FocusRecordError: neither record has map entries of ``log_key``.
        ValueError: ``min_matched`` or ``min_class_count`` below 1.
    """
    require_min_count("min_matched", min_matched)
    require_min_count("min_class_count", min_class_count)
    keys = baseline.map_keys() or candidate.map_keys()
    key = log_key if log_key is not None else (keys[0] if keys else "")
    points_a, points_b = baseline.map_points(key), candidate.map_points(key)
    if log_key is not None and not points_a and not points_b:
        raise FocusRecordError(f"neither {baseline.path} nor {candidate.path} has map entries of log_key {log_key!r}")
    a = points_a[-1] if points_a else None
    b = points_b[-1] if points_b else None
    drift = point_drift(a, b, iou_threshold) if a is not None and b is not None else None
    ea, eb = baseline.entropy_points(), candidate.entropy_points()
    ent = entropy_drift(ea[-1], eb[-1]) if ea and eb else None
    ta, tb = (ea[-1].temperatures if ea else {}), (eb[-1].temperatures if eb else {})
    temperatures = {k: (ta.get(k, math.nan), tb.get(k, math.nan)) for k in dict.fromkeys([*ta, *tb])}
    names = {**baseline.class_names(), **candidate.class_names()}
    metrics_a = focus_metrics(a, names) if a is not None else {}
    metrics_b = focus_metrics(b, names) if b is not None else {}
    checks = gate_checks(drift, b, names, max_drift=max_drift, min_energy_in_box=min_energy_in_box,
                         min_matched=min_matched, min_class_count=min_class_count)
    ba = baseline.boundary_points(boundary_key)
    bb = candidate.boundary_points(boundary_key)
    bound_a, bound_b = (ba[-1] if ba else None), (bb[-1] if bb else None)
    if max_margin_drop is not None:
        checks.append(margin_check(bound_a, bound_b, max_margin_drop=max_margin_drop, min_matched=min_matched,
                                   iou_threshold=iou_threshold))
    notes = []
    for record, point in ((baseline, a), (candidate, b)):
        if point is None and (max_drift is not None or (min_energy_in_box is not None and record is candidate)):
            notes.append(f"{record.path} has no map entries of {key!r}: nothing to compare")
    return Comparison(
        baseline=baseline, candidate=candidate, log_key=key, point_a=a, point_b=b, drift=drift, entropy=ent,
        metrics_a=metrics_a, metrics_b=metrics_b, checks=checks, notes=notes,
        thresholds={"max_drift": max_drift, "min_energy_in_box": min_energy_in_box, "max_margin_drop": max_margin_drop,
                    "min_matched": min_matched, "min_class_count": min_class_count},
        temperatures=temperatures, boundary_a=bound_a, boundary_b=bound_b,
    )


@dataclass
class TrainingCurves:
    """A record's focus over its logging points (for charts).

    Attributes:
        steps: the global step of each map point.
        metrics: ``{name: [value or NaN per point]}`` (:func:`focus_metrics` keys).
        drift_prev: drift of each point from the previous one (NaN for the first).
        entropy_steps, entropy: steps and ``{"<layer>/head<i>": [values]}`` of the entropy readings.
        temperature: ``{block: [T per entropy reading]}`` of learnable attention temperatures.
    """

    steps: list[int]
    metrics: dict[str, list[float]]
    drift_prev: list[float]
    entropy_steps: list[int]
    entropy: dict[str, list[float]]
    temperature: dict[str, list[float]] = field(default_factory=dict)


def training_curves(record: FocusRecord, log_key: str | None = None, iou_threshold: float = 0.5) -> TrainingCurves:
    """Focus metrics, drift from the previous point and entropy, per logging point of ``record``."""
    points = record.map_points(log_key)
    names = record.class_names()
    per_point = [focus_metrics(p, names) for p in points]
    keys = sorted({k for m in per_point for k in m})
    metrics = {k: [m.get(k, math.nan) for m in per_point] for k in keys}
    drift_prev = [math.nan] + [point_drift(a, b, iou_threshold).drift for a, b in zip(points, points[1:])]
    entropy_points = record.entropy_points()
    flat = [p.flat() for p in entropy_points]
    heads = list(dict.fromkeys(k for f in flat for k in f))
    return TrainingCurves(
        steps=[p.step for p in points],
        metrics=metrics,
        drift_prev=drift_prev[: len(points)],
        entropy_steps=[p.step for p in entropy_points],
        entropy={h: [f.get(h, math.nan) for f in flat] for h in heads},
        temperature={b: [p.temperatures.get(b, math.nan) for p in entropy_points]
                     for b in dict.fromkeys(b for p in entropy_points for b in p.temperatures)},
    )
