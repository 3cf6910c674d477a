"""Attention entropy per head, and the collapse detector a user alerts on."""

from __future__ import annotations

import math

import pytest
import torch

from detlens.explainers.entropy import CollapseDetector, attention_entropy, entropy_metrics


def test_uniform_attention_has_entropy_one_and_one_hot_has_zero():
    uniform = torch.full((2, 3, 4, 10), 0.1)
    one_hot = torch.zeros(2, 3, 4, 10)
    one_hot[..., 7] = 1.0
    torch.testing.assert_close(attention_entropy(uniform), torch.ones(3))
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(3))


def test_padding_keys_shrink_the_normaliser_and_padded_queries_are_ignored():
    # Image 1 has 4 valid keys of 10; attention uniform over those 4 is maximal entropy.
    w = torch.zeros(2, 1, 10, 10)
    w[0] = 0.1
    w[1, :, :, :4] = 0.25
    w[1, :, 4:, :] = 0.0
    w[1, :, 4:, 0] = 1.0  # garbage rows at padded queries: must not count
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 4:] = True
    torch.testing.assert_close(attention_entropy(w, padding, padding), torch.ones(1))
    # Without the query mask the one-hot garbage rows pull the mean down.
    assert attention_entropy(w, padding)[0] < 0.9


def test_zero_rows_and_exact_zeros_do_not_produce_nans():
    w = torch.zeros(1, 2, 3, 5)
    w[0, :, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    out = attention_entropy(w)  # rows 1 and 2 are all zero: absent queries
    torch.testing.assert_close(out, torch.full((2,), math.log(2) / math.log(5)))
    assert attention_entropy(torch.zeros(1, 2, 3, 5)).isnan().all()


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match=r"\[B, heads, Q, K\]"):
        attention_entropy(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_entropy(torch.ones(2, 1, 3, 5), torch.zeros(2, 4, dtype=torch.bool))


def test_metric_keys_are_stable_per_layer_and_head():
    metrics = entropy_metrics({"encoder.layers.0.self_attn": torch.tensor([0.5, 0.25])})
    assert metrics == {
        "attention/entropy/encoder.layers.0.self_attn/head0": 0.5,
        "attention/entropy/encoder.layers.0.self_attn/head1": 0.25,
    }


def _feed(detector, series: dict[str, list[float]], every: int = 50) -> dict[int, list[str]]:
    fired = {}
    for i in range(len(next(iter(series.values())))):
        new = detector.update(i * every, {k: v[i] for k, v in series.items()})
        if new:
            fired[i * every] = new
    return fired


def test_collapse_is_flagged_once_when_a_head_loses_most_of_its_entropy():
    collapsing = [0.9, 0.88, 0.86, 0.7, 0.5, 0.3, 0.2, 0.15, 0.1]
    stable = [0.8] * 9
    detector = CollapseDetector(drop_fraction=0.5, window=5)
    fired = _feed(detector, {"enc0/head1": collapsing, "enc0/head0": stable})
    assert fired == {250: ["enc0/head1"]}  # 0.3 < 0.5 * 0.88 (window max), the first drop past half
    assert detector.flagged == {"enc0/head1"}
    assert detector.events[0]["window_max"] == pytest.approx(0.88)


def test_noisy_but_stable_entropy_is_not_flagged():
    g = torch.Generator().manual_seed(0)
    noisy = (0.6 + 0.1 * (torch.rand(200, generator=g) - 0.5)).tolist()
    slowly_sharpening = torch.linspace(0.9, 0.6, 200).tolist()  # normal learning, no collapse
    detector = CollapseDetector(drop_fraction=0.5, window=5)
    assert _feed(detector, {"a/head0": noisy, "b/head0": slowly_sharpening}) == {}


def test_detector_resumes_from_its_state_dict():
    series = [0.9, 0.88, 0.86, 0.7, 0.5, 0.3, 0.2]
    first = CollapseDetector(drop_fraction=0.5, window=5)
    for i, v in enumerate(series[:4]):
        first.update(i, {"k": v})
    resumed = CollapseDetector(drop_fraction=0.5, window=5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.update(4, {"k": series[4]}) == []
    assert resumed.update(5, {"k": series[5]}) == ["k"]
    assert resumed.update(6, {"k": series[6]}) == []  # already flagged: not reported again


def test_detector_ignores_heads_that_did_not_run():
    detector = CollapseDetector(window=3, min_history=2)
    assert detector.update(0, {"k": float("nan")}) == []
    assert detector.state_dict()["history"] == {}


@pytest.mark.parametrize("kwargs", [{"drop_fraction": 1.5}, {"window": 1}, {"window": 4, "min_history": 5}])
def test_detector_refuses_meaningless_settings(kwargs):
    with pytest.raises(ValueError):
        CollapseDetector(**kwargs)
