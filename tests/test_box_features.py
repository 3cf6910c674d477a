"""Each detection's feature vector is the one behind that very box, for every detector family.

Each test recomputes a detection's score (and box where the feature determines it) from
the detector's own tensors, captured by hooks on its ordinary forward, at the place the
feature says it came from — so a feature swapped between detections, or read from the
wrong proposal / anchor / query, fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_convert
from torchvision.ops import boxes as box_ops

from detlens.explainers.box_features import concat_box_features, extract_box_features
from detlens.lightning_modules import TorchvisionDetector
from detlens.lightning_modules.detr import DETR

torch.set_num_threads(1)

IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 56, 80, generator=torch.Generator().manual_seed(2))]


def torchvision_detector(architecture: str) -> TorchvisionDetector:
    torch.manual_seed(0)
    return TorchvisionDetector(
        architecture, num_classes=3, min_size=64, max_size=96,
        fpn_channels=32 if architecture.startswith("fcos") else 16, representation_size=32,
        rpn_proposals_test=30, anchor_sizes=None if architecture.startswith("fcos") else [8, 16, 32, 64, 128],
        score_thresh=0.0,
    ).eval()


def assert_same_detections_as_the_model(module, results, k):
    with torch.no_grad():
        own = module(IMAGES)
    for mine, theirs in zip(results, own):
        assert len(mine) == min(k, len(theirs["scores"])) > 1
        torch.testing.assert_close(mine.boxes, theirs["boxes"][:k], atol=1e-4, rtol=0)
        torch.testing.assert_close(mine.scores, theirs["scores"][:k])
        assert torch.equal(mine.labels, theirs["labels"][:k])


def test_two_stage_feature_is_the_box_head_output_of_the_detections_own_proposal():
    module = torchvision_detector("fasterrcnn_resnet18_fpn")
    net = module.model
    seen = {}
    hooks = [
        net.rpn.register_forward_hook(lambda m, a, o: seen.__setitem__("proposals", o[0])),
        net.roi_heads.box_head.register_forward_hook(lambda m, a, o: seen.__setitem__("rep", o)),
        net.roi_heads.box_predictor.register_forward_hook(lambda m, a, o: seen.__setitem__("pred", o)),
        net.transform.register_forward_hook(lambda m, a, o: seen.__setitem__("sizes", o[0].image_sizes)),
    ]
    try:
        with torch.no_grad():
            module(IMAGES)  # the model's own forward: torchvision's postprocess, nothing of detlens
    finally:
        for h in hooks:
            h.remove()

    results = extract_box_features(module, IMAGES, score_threshold=0.0, max_detections=8)

    assert_same_detections_as_the_model(module, results, 8)
    offsets = [0, len(seen["proposals"][0])]
    logits, regression = seen["pred"]
    for i, result in enumerate(results):
        assert result.family == "two_stage" and result.features.shape == (len(result), 32)
        for d in (1, len(result) - 1):  # a chosen detection, and the last one kept
            row = offsets[i] + int(result.origin[d])
            label = int(result.labels[d])
            torch.testing.assert_close(result.features[d], seen["rep"][row])
            # That proposal's class probability and box are this detection's score and box.
            torch.testing.assert_close(F.softmax(logits[row], -1)[label], result.scores[d])
            proposal = seen["proposals"][i][int(result.origin[d])][None]
            box = net.roi_heads.box_coder.decode(regression[row][None], [proposal])[0, label]
            shape = seen["sizes"][i]
            box = resize_boxes(box_ops.clip_boxes_to_image(box[None], shape), list(shape), list(IMAGES[i].shape[-2:]))
            torch.testing.assert_close(box[0], result.boxes[d], atol=1e-4, rtol=0)
        # Every detection's feature is a different row: none was copied to a neighbour.
        assert len({tuple(f.tolist()) for f in result.features}) == len({int(o) for o in result.origin})


@pytest.mark.parametrize("architecture", ["retinanet_resnet18_fpn", "fcos_resnet18_fpn"])
def test_one_stage_feature_is_the_head_input_at_the_detections_anchor_on_its_level(architecture):
    module = torchvision_detector(architecture)
    net = module.model
    results = extract_box_features(module, IMAGES, score_threshold=0.0, max_detections=6)
    assert_same_detections_as_the_model(module, results, 6)

    with torch.no_grad():
        image_list, _ = net.transform(IMAGES)
        features = net.backbone(image_list.tensors)
        levels = list(features.values())
        head = net.head(levels)
        anchors = net.anchor_generator(image_list, levels)
    keys = list(features.keys())
    counts = [f.shape[-2] * f.shape[-1] * (head["cls_logits"].shape[1] // sum(g.shape[-2] * g.shape[-1] for g in levels))
              for f in levels]
    for i, result in enumerate(results):
        assert result.family == "one_stage"
        for d in (0, len(result) - 1):
            anchor, label, level = int(result.origin[d]), int(result.labels[d]), result.level[d]
            lvl = keys.index(level)
            assert sum(counts[:lvl]) <= anchor < sum(counts[: lvl + 1]), "anchor is on the detection's level"
            fmap = features[level][i]  # [C, h, w]
            stride_y = image_list.tensors.shape[-2] // fmap.shape[-2]
            stride_x = image_list.tensors.shape[-1] // fmap.shape[-1]
            cx, cy = ((anchors[i][anchor, :2] + anchors[i][anchor, 2:]) / 2).tolist()
            torch.testing.assert_close(result.features[d], fmap[:, round(cy / stride_y), round(cx / stride_x)])
            prob = torch.sigmoid(head["cls_logits"][i, anchor, label])
            if architecture.startswith("fcos"):
                prob = torch.sqrt(prob * torch.sigmoid(head["bbox_ctrness"][i, anchor, 0]))
            torch.testing.assert_close(prob, result.scores[d])


def test_detr_feature_is_the_decoder_embedding_its_class_and_box_are_read_from():
    torch.manual_seed(0)
    module = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_queries=12, enc_layers=1, dec_layers=2,
                  nheads=2, dim_feedforward=64, image_size=64, score_thresh=0.0).eval()
    net = module.model
    results = extract_box_features(module, IMAGES, score_threshold=0.0, max_detections=5)
    assert_same_detections_as_the_model(module, results, 5)
    for i, result in enumerate(results):
        assert result.family == "detr" and result.features.shape == (5, 32)
        h, w = IMAGES[i].shape[-2:]
        with torch.no_grad():
            prob = net.class_embed(result.features).softmax(-1)[:, :-1]  # [K, C]
            box = box_convert(net.bbox_embed(result.features).sigmoid(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        torch.testing.assert_close(prob.max(-1).values, result.scores)
        assert torch.equal(prob.argmax(-1) + 1, result.labels)
        torch.testing.assert_close(box.clamp(min=0).minimum(torch.tensor([w, h, w, h])), result.boxes, atol=1e-4, rtol=0)
        assert len(set(result.origin.tolist())) == len(result)  # one query per detection


def test_detections_are_matched_to_ground_truth_and_missed_boxes_listed():
    module = torchvision_detector("fasterrcnn_resnet18_fpn")
    plain = extract_box_features(module, IMAGES, score_threshold=0.0, max_detections=8)
    top = plain[0]
    # GT: the top detection's own box and class (a TP), and a far-away box nobody finds (a FN).
    targets = [
        {"boxes": torch.stack([top.boxes[0], torch.tensor([60.0, 60.0, 63.0, 63.0])]),
         "labels": torch.stack([top.labels[0], torch.tensor(2)]), "image_id": torch.tensor(42)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 43},
    ]
    results = extract_box_features(module, IMAGES, targets, score_threshold=0.0, max_detections=8)

    first, second = results
    assert plain[0].outcome is None and plain[0].image_id == -1
    assert (first.image_id, second.image_id) == (42, 43)
    assert first.outcome[0] == "tp" and int(first.matched_gt[0]) == 0
    assert "tp" not in first.outcome[1:]
    assert first.missed_boxes.tolist() == [[60.0, 60.0, 63.0, 63.0]] and first.missed_labels.tolist() == [2]
    assert set(second.outcome) == {"background"}, "no ground truth: every detection fired on background"

    table = concat_box_features(results, sources=[5, 9])
    assert len(table) == len(first) + len(second)
    assert table.source.tolist() == [5] * len(first) + [9] * len(second)
    assert table.image_id.tolist() == [42] * len(first) + [43] * len(second)
    torch.testing.assert_close(table.features[: len(first)], first.features)
    counts = table.counts()
    assert counts["tp"] == 1 and counts["fn"] == 1 and counts["fp"] == len(table) - 1
    assert table.false_negatives_per_class == {2: 1}
    assert table.status[0] == "tp" and set(table.status[1:]) == {"fp"}


def test_bad_inputs_are_refused_with_a_clear_message():
    module = torchvision_detector("fasterrcnn_resnet18_fpn")
    with pytest.raises(ValueError, match="1 targets for 2 images"):
        extract_box_features(module, IMAGES, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(TypeError, match="no adapter"):
        extract_box_features(torch.nn.Linear(2, 2), IMAGES)
    results = extract_box_features(module, IMAGES, score_threshold=0.0, max_detections=2)
    other = extract_box_features(torchvision_detector("retinanet_resnet18_fpn"), IMAGES, score_threshold=0.0,
                                 max_detections=2)
    with pytest.raises(ValueError, match="feature widths differ"):
        concat_box_features([results[0], other[0]])  # 32-wide box-head vs 16-wide FPN features
