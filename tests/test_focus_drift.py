"""Focus drift: identical maps do not drift, moved maps do; detections are matched by class and IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detlens.focus.drift import entropy_drift, focus_metrics, map_similarity, match_between, point_drift
from detlens.focus.record import EntropyPoint, FocusImage, MapPoint

SIZE = 64


def blob(cx: float, cy: float, sigma: float = 5.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def image(index: int, boxes: list[list[float]], labels: list[int], centres: list[tuple[float, float]]) -> FocusImage:
    raw = torch.stack([blob(cx, cy) for cx, cy in centres])
    return FocusImage.from_tensors(index, torch.tensor(boxes), torch.tensor(labels), torch.full((len(labels),), 0.9), raw)


def point(step: int, images: list[FocusImage]) -> MapPoint:
    return MapPoint("gradcam", step, 0, "gradcam", "features", images, {1: "circle", 2: "square"})


BOXES = [[4.0, 4.0, 28.0, 28.0], [34.0, 30.0, 60.0, 60.0]]
ON_OBJECTS = [(16.0, 16.0), (47.0, 45.0)]


def test_identical_maps_do_not_drift():
    a = point(4, [image(0, BOXES, [1, 2], ON_OBJECTS), image(1, BOXES[:1], [1], ON_OBJECTS[:1])])
    b = point(8, [image(0, BOXES, [1, 2], ON_OBJECTS), image(1, BOXES[:1], [1], ON_OBJECTS[:1])])
    d = point_drift(a, b)
    assert d.drift == pytest.approx(0.0, abs=1e-9) and d.similarity == pytest.approx(1.0)
    assert d.spearman == pytest.approx(1.0) and d.matched == 3 and d.match_rate == 1.0
    assert d.scalars("prev") == pytest.approx({"drift_prev": 0.0, "similarity_prev": 1.0, "match_rate_prev": 1.0}, abs=1e-9)


def test_maps_that_move_drift_more_the_further_they_move():
    base = point(4, [image(0, BOXES, [1, 2], ON_OBJECTS)])
    drifts = []
    for shift in (4.0, 12.0, 30.0):
        moved = [(cx + shift, cy) for cx, cy in ON_OBJECTS]
        drifts.append(point_drift(base, point(8, [image(0, BOXES, [1, 2], moved)])).drift)
    assert 0.0 < drifts[0] < drifts[1] < drifts[2], drifts
    assert drifts[2] > 0.5, "maps that left their objects are far from the originals"
    similarity = point_drift(base, point(8, [image(0, BOXES, [1, 2], [(cx + 30, cy) for cx, cy in ON_OBJECTS])])).similarity
    assert similarity < 0.2


def test_detections_are_matched_by_class_and_iou():
    a_boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32)
    b_boxes = np.array([[21, 21, 41, 41], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    assert match_between(a_boxes, np.array([1, 2, 1]), b_boxes, np.array([2, 1, 2])) == [(0, 1), (1, 0)]
    # Same place, other class: no match; too little overlap: no match.
    assert match_between(a_boxes[:1], np.array([1]), a_boxes[:1], np.array([2])) == []
    assert match_between(a_boxes[:1], np.array([1]), np.array([[4, 4, 14, 14]], np.float32), np.array([1])) == []
    assert match_between(a_boxes[:1], np.array([1]), np.array([[4, 4, 14, 14]], np.float32), np.array([1]), iou_threshold=0.1) == [(0, 0)]
    # One-to-one: the assignment with the best total IoU, not greedy.
    a2 = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], np.float32)
    b2 = np.array([[3, 0, 13, 10], [8, 0, 18, 10]], np.float32)
    assert match_between(a2, np.array([1, 1]), b2, np.array([1, 1]), iou_threshold=0.3) == [(0, 0), (1, 1)]


def test_a_point_drift_compares_only_matched_detections_and_reports_the_rest():
    a = point(4, [image(0, BOXES, [1, 2], ON_OBJECTS), image(2, BOXES[:1], [1], ON_OBJECTS[:1])])
    # Image 0: the square's detection became a circle (unmatched); image 1 is new, image 2 gone.
    b = point(8, [image(0, BOXES, [1, 1], ON_OBJECTS), image(1, BOXES[:1], [1], ON_OBJECTS[:1])])
    d = point_drift(a, b)
    assert d.matched == 1 and (d.count_a, d.count_b) == (2, 2) and d.match_rate == 0.5
    assert d.missing_images == [1, 2] and [i.probe_index for i in d.images] == [0]
    assert d.drift == pytest.approx(0.0, abs=1e-9)
    nothing = point_drift(a, point(8, [image(0, BOXES, [2, 1], ON_OBJECTS)]))
    assert nothing.matched == 0 and math.isnan(nothing.drift) and nothing.scalars("x") == {"match_rate_x": 0.0}


def test_constant_maps_have_no_rank_correlation_but_a_defined_drift():
    zero, peak = np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), np.float32)
    peak[0, 2, 3] = 1.0
    rho, cosine = map_similarity(zero, zero)
    assert math.isnan(rho[0]) and cosine[0] == 1.0
    a = FocusImage.from_tensors(0, torch.tensor([BOXES[0]]), torch.tensor([1]), torch.tensor([0.9]), torch.zeros(1, SIZE, SIZE))
    b = FocusImage.from_tensors(0, torch.tensor([BOXES[0]]), torch.tensor([1]), torch.tensor([0.9]), blob(16, 16)[None])
    assert point_drift(point(1, [a]), point(2, [a])).drift == 0.0
    assert point_drift(point(1, [a]), point(2, [b])).drift == 1.0


def test_entropy_drift_is_the_change_per_layer_and_head():
    a = EntropyPoint("attention", 4, 0, "probe", {"enc": np.array([0.9, 0.5], np.float32), "dec": np.array([0.7], np.float32)})
    b = EntropyPoint("attention", 8, 1, "probe", {"enc": np.array([0.6, 0.5], np.float32), "dec": np.array([0.8], np.float32)})
    d = entropy_drift(a, b)
    assert d.per_head == pytest.approx({"enc/head0": 0.3, "enc/head1": 0.0, "dec/head0": 0.1}, abs=1e-6)
    assert d.mean == pytest.approx(0.4 / 3, abs=1e-6) and d.max == pytest.approx(0.3, abs=1e-6)
    assert entropy_drift(a, a).mean == 0.0


def test_focus_metrics_are_per_class_over_true_positives():
    images = []
    for index, (tp, energy, pointing) in enumerate([([True, False], [0.8, np.nan], [1.0, np.nan]), ([True, True], [0.4, 0.6], [0.0, 1.0])]):
        focus = {"is_tp": torch.tensor(tp), "energy_in_box": torch.tensor(energy), "chance": torch.tensor([0.1, 0.2]),
                 "pointing_game": torch.tensor(pointing)}
        target = {"boxes": torch.tensor([BOXES[0]]), "labels": torch.tensor([1])}
        raw = torch.stack([blob(16, 16), blob(47, 45)])
        images.append(FocusImage.from_tensors(index, torch.tensor(BOXES), torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), raw, focus, target))
    metrics = focus_metrics(point(4, images))
    assert metrics["true_positive_rate"] == pytest.approx(0.75)
    assert metrics["energy_in_box"] == pytest.approx((0.8 + 0.4 + 0.6) / 3)
    assert metrics["energy_in_box/circle"] == pytest.approx(0.6) and metrics["energy_in_box/square"] == pytest.approx(0.6)
    assert metrics["pointing_game/circle"] == pytest.approx(0.5) and metrics["pointing_game/square"] == pytest.approx(1.0)
    assert metrics["energy_in_box_chance"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
