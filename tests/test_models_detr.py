"""DETR: Hungarian matching, learning, padded batches, and the module names explainers rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detlens.lightning_modules import DETR
from detlens.lightning_modules.detr_loss import HungarianMatcher

pytestmark = pytest.mark.numerics  # trains or checks trained-model numbers: `make test` runs it twice


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # The tensors here are tiny: intra-op threads cost more than they give on a shared CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_detr(**overrides) -> DETR:
    kwargs = dict(
        num_classes=3,
        backbone="resnet18",
        backbone_stage="layer3",
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        num_queries=8,
        image_size=64,
    )
    kwargs.update(overrides)
    return DETR(**kwargs)


def scenes():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 32, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [36.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 4.0, 40.0, 28.0]]), "labels": torch.tensor([3])},
    ]
    for img, t in zip(images, targets):
        for box, label in zip(t["boxes"].long(), t["labels"]):
            img[label - 1, box[1] : box[3], box[0] : box[2]] = 1.0  # class = colour channel
    return images, targets


def test_matcher_pairs_each_prediction_with_its_obvious_target():
    matcher = HungarianMatcher()
    targets = [
        {
            "labels": torch.tensor([0, 1, 2]),
            "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.2], [0.5, 0.8, 0.3, 0.1]]),
        }
    ]
    # query 0 ~ target 2, query 2 ~ target 0, query 3 ~ target 1, query 1 matches nothing
    boxes = torch.tensor([[[0.5, 0.79, 0.3, 0.1], [0.9, 0.9, 0.05, 0.05], [0.21, 0.2, 0.1, 0.1], [0.7, 0.31, 0.2, 0.2]]])
    logits = torch.full((1, 4, 4), -4.0)
    logits[0, 0, 2] = logits[0, 2, 0] = logits[0, 3, 1] = 4.0
    logits[0, 1, 3] = 4.0  # "no object"

    (queries, target_idx), = matcher(logits, boxes, targets)

    assert dict(zip(queries.tolist(), target_idx.tolist())) == {0: 2, 2: 0, 3: 1}


def test_matcher_handles_images_without_objects():
    matcher = HungarianMatcher()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    matches = matcher(torch.randn(2, 5, 3), torch.rand(2, 5, 4), [empty, one])
    assert len(matches[0][0]) == 0 and len(matches[1][0]) == 1


def test_detr_overfits_a_fixed_batch_and_reports_every_loss_term():
    torch.manual_seed(0)
    images, targets = scenes()
    module = tiny_detr()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    totals = []
    for _ in range(25):
        losses = module.model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())

    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_aux", "loss_bbox_aux", "loss_giou_aux"}
    assert sum(totals[-3:]) < 0.5 * sum(totals[:3]), totals


def test_eval_returns_detections_in_each_input_images_pixels():
    module = tiny_detr(score_thresh=0.0).eval()
    images, _ = scenes()
    with torch.no_grad():
        detections = module(images)

    assert len(detections) == 2
    for det, img in zip(detections, images):
        h, w = img.shape[-2:]
        assert det["boxes"].shape == (8, 4) and det["scores"].shape == (8,) and det["labels"].shape == (8,)
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3
        assert (det["boxes"][:, [0, 2]] <= w).all() and (det["boxes"][:, [1, 3]] <= h).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted


def test_padding_of_a_smaller_image_gets_no_attention_and_its_boxes_stay_inside_it():
    # A CNN backbone cannot be exactly padding-invariant (deeper receptive fields see the
    # padded zeros), so DETR masks the padding instead: no encoder or decoder attention
    # may land on it, and boxes are reported in the image's own pixels.
    from detlens.explainers.attention import AttentionCapture

    torch.manual_seed(0)
    module = tiny_detr(score_thresh=0.0).eval()
    images, _ = scenes()  # 64x64 next to 32x64: the second is padded to 64x64
    with torch.no_grad(), AttentionCapture(module) as cap:
        detections = module(images)

    cross = [n for n in cap.weights if "multihead_attn" in n]
    selfs = [n for n in cap.weights if "encoder" in n and "self_attn" in n]
    assert cross and selfs
    padding = cap.key_padding_masks[cross[-1]][1]  # [K] True on padded feature cells
    assert padding.any() and not cap.key_padding_masks[cross[-1]][0].any()
    for name in cross + selfs:
        weights = cap.weights[name]  # [B, heads, Q, K]
        assert weights[1][..., padding].abs().max() == 0, name
        assert weights[0].sum(-1).sub(1).abs().max() < 1e-5
    boxes = detections[1]["boxes"]
    assert (boxes[:, [1, 3]] <= 32 + 1e-4).all() and (boxes[:, [0, 2]] <= 64 + 1e-4).all()


def test_resizing_keeps_boxes_in_input_pixels():
    module = tiny_detr(score_thresh=0.0, image_size=32).eval()
    with torch.no_grad():
        det = module([torch.rand(3, 64, 128)])[0]
    assert det["boxes"][:, [0, 2]].max() <= 128 and det["boxes"][:, [1, 3]].max() <= 64
    assert det["boxes"][:, [0, 2]].max() > 32  # scaled back from the 16x32 network input


def test_named_submodules_explainers_rely_on():
    net = tiny_detr(enc_layers=2, dec_layers=3).model
    assert isinstance(net.backbone.layer3, nn.Module) and isinstance(net.input_proj, nn.Conv2d)
    assert len(net.encoder.layers) == 2 and len(net.decoder.layers) == 3
    assert all(isinstance(layer.self_attn, nn.MultiheadAttention) for layer in net.encoder.layers)
    assert all(isinstance(layer.multihead_attn, nn.MultiheadAttention) for layer in net.decoder.layers)
    assert net.query_embed.weight.shape == (8, 32) and net.class_embed.out_features == 4


def test_cross_attention_weights_can_be_read_with_a_hook():
    # detlens reads nn.MultiheadAttention weights by forcing need_weights in a pre-hook.
    module = tiny_detr().eval()
    captured = []

    def force_weights(mod, args, kwargs):
        kwargs["need_weights"], kwargs["average_attn_weights"] = True, False
        return args, kwargs

    attn = module.model.decoder.layers[-1].multihead_attn
    handles = [
        attn.register_forward_pre_hook(force_weights, with_kwargs=True),
        attn.register_forward_hook(lambda m, i, o: captured.append(o[1])),
    ]
    try:
        with torch.no_grad():
            module([torch.rand(3, 64, 64)])
    finally:
        for h in handles:
            h.remove()
    assert captured[0].shape == (1, 4, 8, 16)  # [B, heads, queries, 4x4 positions at stride 16]
    torch.testing.assert_close(captured[0].sum(-1), torch.ones(1, 4, 8))


def test_backbone_gets_its_own_learning_rate():
    module = tiny_detr(lr=1e-3, lr_backbone=1e-4)
    groups = module.parameter_groups()
    trunk = {id(p) for p in module.model.backbone.parameters()}
    for group in groups:
        if group["params"] and id(group["params"][0]) in trunk:
            assert group["lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in module.parameters() if p.requires_grad)
