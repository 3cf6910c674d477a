"""Gates that know their uncertainty: each gated metric with its count, an interval and a verdict.

A focus gate compares a mean over detections (map drift over matched detections, a
class's energy-in-box over its true positives) with a threshold. With the handful of
detections an early model or a small probe set gives, that mean is noisy: two models
trained alike with different seeds can differ by more than any useful threshold. So
every gated metric carries

* its **count** (how many detections the mean is over) and a **95% bootstrap interval**
  of the mean (percentile bootstrap over detections, a fixed seed: the same record
  gives the same interval on any machine);
* a **verdict**, one of three:

  - ``"fail"``: the whole interval lies beyond the threshold (the evidence says the
    threshold was crossed);
  - ``"insufficient"``: fewer detections than the minimum, no value at all, or a mean
    beyond the threshold whose interval still reaches back across it (a crossing the
    evidence does not show);
  - ``"pass"``: the mean is within the threshold.

A gate's overall verdict is ``"fail"`` if any check fails, else ``"insufficient"`` if
any check lacks evidence, else ``"pass"``: a gate never passes on nothing.

Pure NumPy: no Lightning, no wandb.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "CONFIDENCE",
    "MIN_CLASS_COUNT",
    "MIN_MATCHED",
    "RESAMPLES",
    "Check",
    "Verdict",
    "bootstrap_interval",
    "judge",
    "overall_verdict",
    "require_min_count",
]

Verdict = Literal["pass", "fail", "insufficient"]

MIN_MATCHED = 5
"""Default minimum of matched detections behind a map-drift verdict."""
MIN_CLASS_COUNT = 5
"""Default minimum of true positives behind a class's energy-in-box verdict."""
CONFIDENCE = 0.95
RESAMPLES = 2000


def require_min_count(arg: str, value: object) -> int:
    """``value`` as a minimum count of detections: an integer ``>= 1``, else a ``ValueError``
    naming ``arg`` (a gate never decides on nothing)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be an integer >= 1 (a gate never decides on nothing), got {value!r}")
    return value


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (finite entries only).

    Returns:
        ``(low, high)``; ``(nan, nan)`` without a finite value; ``(v, v)`` for one value.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Check:
    """One gated metric and what the evidence says about it.

    Attributes:
        name: what is gated (``"map drift"``, ``"energy_in_box/circle"``).
        value: the mean (NaN when there is none); low, high: its bootstrap interval.
        count: how many detections the mean is over; min_count: the minimum required.
        threshold: the threshold; bound: ``"max"`` (value must stay at or below it) or
            ``"min"`` (at or above it).
        verdict: ``"pass"``, ``"fail"`` or ``"insufficient"``; reason: a sentence for people.
    """

    name: str
    value: float
    low: float
    high: float
    count: int
    min_count: int
    threshold: float
    bound: Literal["max", "min"]
    verdict: Verdict
    reason: str

    def summary(self) -> str:
        """``"map drift 0.412 [0.35, 0.47] over 23 (max 0.5)"``."""
        if not math.isfinite(self.value):
            return f"{self.name}: no value ({self.count} detections; {self.bound} {self.threshold:g})"
        return (f"{self.name} {self.value:.3f} [{self.low:.3f}, {self.high:.3f}] over {self.count} "
                f"({self.bound} {self.threshold:g})")


def judge(
    name: str,
    values: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    bound: Literal["max", "min"],
    min_count: int,
    unit: str = "detections",
    param: str | None = None,
    seed: int = 0,
) -> Check:
    """The verdict on the mean of ``values`` (one per detection) against ``threshold``.

    Args:
        values: per-detection values; NaN entries are left out of the count and the mean.
        bound: ``"max"``: fail when the mean exceeds the threshold; ``"min"``: fail when it
            falls below.
        min_count: fewer finite values than this is ``"insufficient"`` (``>= 1``).
        unit: what a value is, for the reason text.
        param: the threshold's option name for the reason text (``"max_drift"``); default ``bound``.
    """
    require_min_count("min_count", min_count)
    if bound not in ("max", "min"):
        raise ValueError(f"bound must be 'max' or 'min', got {bound!r}")
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    count = int(v.size)
    value = float(v.mean()) if count else math.nan
    low, high = bootstrap_interval(v, seed=seed)
    op = ">" if bound == "max" else "<"
    limit = f"{param or bound} {threshold:g}"
    if count < min_count:
        verdict: Verdict = "insufficient"
        reason = f"{name}: {count} {unit}, fewer than the {min_count} needed for a verdict"
        if count:
            reason += f" (mean {value:.3f}, {limit})"
    else:
        beyond = value > threshold if bound == "max" else value < threshold
        interval_beyond = low > threshold if bound == "max" else high < threshold
        interval = f"[{low:.3f}, {high:.3f}]"
        if interval_beyond:
            verdict, reason = "fail", (f"{name} is {value:.3f} {op} {limit}: its 95% interval {interval} "
                                       f"over {count} {unit} lies beyond it")
        elif beyond:
            verdict, reason = "insufficient", (f"{name} is {value:.3f} {op} {limit}, but its 95% interval "
                                               f"{interval} over {count} {unit} reaches across it")
        else:
            verdict, reason = "pass", f"{name} {value:.3f} {interval} over {count} {unit} is within {limit}"
    return Check(name, value, low, high, count, int(min_count), float(threshold), bound, verdict, reason)


def overall_verdict(checks: Iterable[Check], extra: Iterable[Verdict] = ()) -> Verdict:
    """``"fail"`` if any check fails, else ``"insufficient"`` if any lacks evidence, else ``"pass"``."""
    verdicts = [c.verdict for c in checks] + list(extra)
    if "fail" in verdicts:
        return "fail"
    if "insufficient" in verdicts:
        return "insufficient"
    return "pass"
