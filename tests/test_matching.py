"""TP / FP (and why) / FN labels of detections on hand-made boxes, COCO-style greedy matching."""

from __future__ import annotations

import pytest
import torch

from detlens.explainers.matching import FP_REASONS, match_detections

CAT, DOG = 1, 2
#                     x1    y1    x2    y2
GT_BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # 0: a cat
                         [20.0, 0.0, 30.0, 10.0],    # 1: a dog
                         [40.0, 0.0, 50.0, 10.0],    # 2: a cat nobody finds
                         [60.0, 0.0, 70.0, 10.0]])   # 3: a dog
GT_LABELS = torch.tensor([CAT, DOG, CAT, DOG])


def match(boxes, labels, scores, **kw):
    return match_detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels),
                            torch.tensor(scores), GT_BOXES, GT_LABELS, **kw)


def test_every_outcome_on_a_hand_made_scene():
    result = match(
        [[0, 0, 10, 10],      # exact cat                            -> tp (gt 0)
         [1, 0, 10, 10],      # same cat again, lower score          -> duplicate
         [20, 0, 30, 10],     # right box on the dog, labelled cat   -> wrong class
         [0, 0, 10, 20],      # cat box twice too tall (IoU 0.5)     -> but cat 0 is taken: duplicate
         [60, 0, 66, 10],     # dog box, IoU 0.6 with dog 3          -> tp (gt 3)
         [80, 80, 90, 90],    # nothing there                        -> background
         [20, 0, 26, 10],     # dog, IoU 0.6 with dog 1            -> tp (gt 1): the cat-labelled box did not take it
         [60, 5, 70, 30]],    # dog, IoU 1/6 with dog 3            -> localization
        [CAT, CAT, CAT, CAT, DOG, DOG, DOG, DOG],
        [0.9, 0.8, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3],
    )
    assert result.outcome == ("tp", "duplicate", "wrong_class", "duplicate", "tp", "background", "tp", "localization")
    assert result.matched_gt.tolist() == [0, -1, -1, -1, 3, -1, 1, -1]
    assert result.missed_gt.tolist() == [2], "the second cat is the only false negative"
    assert result.is_tp.tolist() == [True, False, False, False, True, False, True, False]
    assert result.status == ("tp", "fp", "fp", "fp", "tp", "fp", "tp", "fp")
    assert result.fp_reason[:3] == (None, "duplicate", "wrong_class")
    counts = result.counts()
    assert (counts["tp"], counts["fp"], counts["fn"]) == (3, 5, 1)
    assert counts["fp/duplicate"] == 2 and counts["fp/background"] == 1 and counts["fp/class_and_localization"] == 0
    torch.testing.assert_close(result.max_iou[[0, 5]], torch.tensor([1.0, 0.0]))


def test_higher_score_wins_the_ground_truth_whatever_the_input_order():
    # Listed low score first: the 0.9 detection still takes the cat and the 0.2 one is the duplicate.
    result = match([[0, 0, 10, 9], [0, 0, 10, 10]], [CAT, CAT], [0.2, 0.9])
    assert result.outcome == ("duplicate", "tp") and result.matched_gt.tolist() == [-1, 0]


def test_a_detection_takes_its_best_free_ground_truth_and_the_next_one_the_other():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    boxes = torch.tensor([[1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    result = match_detections(boxes, torch.tensor([1, 1]), torch.tensor([0.9, 0.8]), gt, torch.tensor([1, 1]))
    assert result.outcome == ("tp", "tp") and sorted(result.matched_gt.tolist()) == [0, 1]
    assert result.missed_gt.numel() == 0


def test_class_and_localization_error_and_the_thresholds():
    # A dog detection over the cat, three times too tall (IoU 1/3): wrong class and off.
    result = match([[0, 0, 10, 30]], [DOG], [0.9], iou_threshold=0.5)
    assert result.outcome == ("class_and_localization",)
    # Same box with a looser IoU threshold: a right box with the wrong label.
    assert match([[0, 0, 10, 30]], [DOG], [0.9], iou_threshold=0.3).outcome == ("wrong_class",)
    # The IoU a match needs is inclusive (COCO: >=); IoU exactly 0.5 is a TP.
    assert match([[0, 0, 10, 20]], [CAT], [0.9]).outcome == ("tp",)
    # Below the background threshold every overlap is ignored.
    assert match([[9, 9, 19, 19]], [CAT], [0.9], background_threshold=0.1).outcome == ("background",)
    assert match([[9, 9, 19, 19]], [CAT], [0.9], background_threshold=0.0).outcome == ("localization",)


def test_empty_images():
    none = match_detections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), GT_BOXES, GT_LABELS)
    assert none.outcome == () and none.missed_gt.tolist() == [0, 1, 2, 3] and none.counts()["fn"] == 4
    no_gt = match_detections(torch.tensor([[0.0, 0, 5, 5], [1.0, 1, 6, 6]]), torch.tensor([1, 2]), torch.tensor([0.5, 0.4]),
                             torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert no_gt.outcome == ("background", "background") and no_gt.max_iou.tolist() == [0.0, 0.0]
    assert len(no_gt) == 2 and set(no_gt.outcome) <= set(FP_REASONS)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="iou_threshold"):
        match([[0, 0, 1, 1]], [CAT], [0.5], iou_threshold=0.0)
    with pytest.raises(ValueError, match="background_threshold"):
        match([[0, 0, 1, 1]], [CAT], [0.5], background_threshold=0.7)
    with pytest.raises(ValueError, match=r"pred_boxes must have shape \[N, 4\]"):
        match_detections(torch.zeros(3), torch.zeros(3), torch.zeros(3), GT_BOXES, GT_LABELS)
    with pytest.raises(ValueError, match="pred_scores has 1 rows, expected 2"):
        match_detections(torch.zeros(2, 4), torch.zeros(2), torch.zeros(1), GT_BOXES, GT_LABELS)
