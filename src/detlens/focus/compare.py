"""Compare two focus records (a baseline and a candidate), and a record's focus over training.

Used by ``detlens compare`` / ``detlens report`` and by
:class:`~detlens.callbacks.focus.FocusRegressionCallback` (through :mod:`detlens.focus.drift`).

The comparison takes each record's **last** map point of one ``log_key`` (by default the
first map source in the baseline, e.g. ``"gradcam"``) — the trained model's focus — and
its last attention-entropy reading, and checks two thresholds:

* ``max_drift``: the candidate's map drift from the baseline (mean ``1 - Spearman rho``
  over matched detections, :func:`detlens.focus.drift.point_drift`) must not exceed it;
  a comparison in which no detection could be matched also fails (nothing certifies the
  candidate's focus);
* ``min_energy_in_box``: every class's mean energy-in-box (over the candidate's true
  positives) must reach it; a candidate without any true positive fails it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from detlens.focus.drift import EntropyDrift, PointDrift, entropy_drift, focus_metrics, point_drift
from detlens.focus.record import FocusRecord, FocusRecordError, MapPoint, read_focus_record

__all__ = ["Comparison", "TrainingCurves", "compare_records", "load_record", "training_curves", "threshold_violations"]


def load_record(path: str | Path) -> FocusRecord:
    """A focus record from a W&B run folder, a ``detlens_focus`` folder or a ``focus.jsonl`` file."""
    return read_focus_record(path)


def threshold_violations(
    drift: PointDrift | None,
    metrics: dict[str, float],
    *,
    max_drift: float | None,
    min_energy_in_box: float | None,
    what: str = "baseline",
) -> list[str]:
    """Human-readable threshold crossings (empty when everything passes).

    Args:
        drift: drift of the candidate from ``what`` (``None``: not compared).
        metrics: :func:`~detlens.focus.drift.focus_metrics` of the candidate.
    """
    out: list[str] = []
    if max_drift is not None and drift is not None:
        if drift.matched == 0 and max(drift.count_a, drift.count_b) > 0:
            out.append(
                f"no detection could be matched with the {what} ({drift.count_a} vs {drift.count_b} detections on "
                f"{len(drift.images)} shared probe images): focus drift cannot be measured"
            )
        elif math.isfinite(drift.drift) and drift.drift > max_drift:
            out.append(
                f"focus drift from the {what} is {drift.drift:.3f} (1 - Spearman rho, mean over {drift.matched} matched "
                f"detections) > max_drift {max_drift:g}"
            )
    if min_energy_in_box is not None:
        for key, value in sorted(metrics.items()):
            if key.startswith("energy_in_box/") and value < min_energy_in_box:
                out.append(f"{key} is {value:.3f} < min_energy_in_box {min_energy_in_box:g}")
    return out


@dataclass
class Comparison:
    """A baseline and a candidate record compared at their last points.

    Attributes:
        baseline, candidate: the records; log_key: the map source compared.
        point_a, point_b: the compared map points (``None`` if a record has none).
        drift: map drift from baseline to candidate; entropy: attention-entropy drift
            (``None`` without entropy in both).
        metrics_a, metrics_b: :func:`~detlens.focus.drift.focus_metrics` of each point.
        violations: threshold crossings; thresholds: ``{"max_drift", "min_energy_in_box"}``.
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
    violations: list[str] = field(default_factory=list)
    thresholds: dict[str, float | None] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.violations


def compare_records(
    baseline: FocusRecord,
    candidate: FocusRecord,
    *,
    log_key: str | None = None,
    max_drift: float | None = 0.5,
    min_energy_in_box: float | None = None,
    iou_threshold: float = 0.5,
) -> Comparison:
    """Compares the candidate's last logging point with the baseline's.

    Raises:
        FocusRecordError: neither record has map entries of ``log_key``.
    """
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
    names = {**baseline.class_names(), **candidate.class_names()}
    metrics_a = focus_metrics(a, names) if a is not None else {}
    metrics_b = focus_metrics(b, names) if b is not None else {}
    violations = threshold_violations(drift, metrics_b, max_drift=max_drift, min_energy_in_box=min_energy_in_box)
    if min_energy_in_box is not None and b is not None and not any(k.startswith("energy_in_box/") for k in metrics_b):
        violations.append(
            f"the candidate has no true positive on the probe set (step {b.step}): energy-in-box cannot be checked"
        )
    if max_drift is not None and (a is None) != (b is None):
        missing = baseline if a is None else candidate
        violations.append(f"{missing.path} has no map entries of {key!r}: nothing to compare with")
    return Comparison(
        baseline=baseline, candidate=candidate, log_key=key, point_a=a, point_b=b, drift=drift, entropy=ent,
        metrics_a=metrics_a, metrics_b=metrics_b, violations=violations,
        thresholds={"max_drift": max_drift, "min_energy_in_box": min_energy_in_box},
    )


@dataclass
class TrainingCurves:
    """A record's focus over its logging points (for charts).

    Attributes:
        steps: the global step of each map point.
        metrics: ``{name: [value or NaN per point]}`` (:func:`focus_metrics` keys).
        drift_prev: drift of each point from the previous one (NaN for the first).
        entropy_steps, entropy: steps and ``{"<layer>/head<i>": [values]}`` of the entropy readings.
    """

    steps: list[int]
    metrics: dict[str, list[float]]
    drift_prev: list[float]
    entropy_steps: list[int]
    entropy: dict[str, list[float]]


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
    )
