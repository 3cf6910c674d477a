"""Gate verdicts: a threshold is crossed only when the evidence shows it, and nothing never passes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detlens.focus.evidence import bootstrap_interval, judge, overall_verdict


def test_the_bootstrap_interval_holds_the_mean_is_seeded_and_narrows_with_more_detections():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.5, 0.2, 8), rng.normal(0.5, 0.2, 800)
    low, high = bootstrap_interval(few)
    assert low < few.mean() < high
    assert bootstrap_interval(few) == (low, high), "the same values give the same interval on any machine"
    low_many, high_many = bootstrap_interval(many)
    assert high_many - low_many < (high - low) / 5
    assert bootstrap_interval([0.3]) == (0.3, 0.3) and bootstrap_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)
    assert all(math.isnan(x) for x in bootstrap_interval([float("nan")]))


@pytest.mark.parametrize("bound, threshold, verdict", [
    ("max", 0.1, "fail"),          # the whole interval above a max
    ("max", 0.49, "insufficient"), # the mean above it, the interval reaching back across
    ("max", 0.9, "pass"),
    ("min", 0.9, "fail"),
    ("min", 0.51, "insufficient"),
    ("min", 0.1, "pass"),
])
def test_a_verdict_follows_the_interval_not_the_mean_alone(bound, threshold, verdict):
    values = np.linspace(0.3, 0.7, 11)  # mean 0.5, interval about [0.43, 0.57]
    check = judge("m", values, threshold=threshold, bound=bound, min_count=5)
    assert check.verdict == verdict, check.reason
    assert check.count == 11 and check.value == pytest.approx(0.5) and check.low < 0.5 < check.high


def test_too_few_or_no_values_are_not_enough_evidence_and_nan_is_not_a_value():
    assert judge("m", [0.9, 0.95], threshold=0.5, bound="max", min_count=5).verdict == "insufficient"
    empty = judge("m", [], threshold=0.5, bound="max", min_count=1)
    assert empty.verdict == "insufficient" and empty.count == 0 and math.isnan(empty.value)
    nan = judge("m", [float("nan")] * 6, threshold=0.5, bound="min", min_count=5)
    assert nan.verdict == "insufficient" and nan.count == 0
    with pytest.raises(ValueError, match="min_count"):
        judge("m", [1.0], threshold=0.5, bound="max", min_count=0)


def test_the_overall_verdict_never_passes_on_nothing_and_fails_on_any_failure():
    fail = judge("a", [0.9] * 6, threshold=0.5, bound="max", min_count=5)
    short = judge("b", [0.1], threshold=0.5, bound="max", min_count=5)
    ok = judge("c", [0.1] * 6, threshold=0.5, bound="max", min_count=5)
    assert overall_verdict([ok, short, fail]) == "fail"
    assert overall_verdict([ok, short]) == "insufficient"
    assert overall_verdict([ok]) == "pass"
    assert overall_verdict([ok], ["insufficient"]) == "insufficient"
