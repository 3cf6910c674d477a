"""Attention as pictures: per-detection maps over the image, reference points, rollout."""

from __future__ import annotations

import torch

from detlens.explainers.attention import AttentionCapture
from detlens.explainers.rollout import (
    attention_rollout,
    decoder_rollout,
    minmax_normalize,
    point_attention_maps,
    query_attention_maps,
    transformer_attention_names,
)
from detlens.lightning_modules.detr import DETRNet


def _rows(b: int, h: int, q: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, q, k, generator=g).softmax(-1)


def test_rollout_rows_are_distributions_through_every_layer():
    layers = [_rows(2, 4, 12, 12, seed=i) for i in range(3)]
    rollout = attention_rollout(layers)
    assert rollout.shape == (2, 12, 12)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 12))
    composed = decoder_rollout(_rows(2, 4, 5, 12, seed=9), rollout)
    assert composed.shape == (2, 5, 12)
    torch.testing.assert_close(composed.sum(-1), torch.ones(2, 5))


def test_rollout_of_a_single_layer_is_half_attention_half_residual():
    w = _rows(1, 2, 4, 4)
    expected = 0.5 * w.mean(1) + 0.5 * torch.eye(4)
    torch.testing.assert_close(attention_rollout([w]), expected)


def test_a_query_reading_one_cell_lights_up_that_part_of_the_image_and_padding_is_cropped():
    # Feature grid 4 x 6 for a padded batch; image 1 covers only the top-left 2 x 3 cells.
    hf, wf = 4, 6
    weights = torch.zeros(2, 2, 3, hf * wf)
    weights[:, :, 0, 0] = 1.0  # query 0: top-left cell
    weights[1, :, 1, 1 * wf + 2] = 1.0  # query 1 of image 1: bottom-right valid cell
    weights[0, :, 1:, :] = 1.0 / (hf * wf)
    weights[1, :, 2, :] = 1.0 / (hf * wf)
    mask = torch.ones(2, hf, wf, dtype=torch.bool)
    mask[0] = False
    mask[1, :2, :3] = False
    maps = query_attention_maps(
        weights, (hf, wf), [(40, 60), (20, 30)], queries=[torch.tensor([0]), torch.tensor([0, 1])],
        feature_padding_mask=mask,
    )
    assert maps[0].raw.shape == (1, 40, 60) and maps[1].raw.shape == (2, 20, 30)
    top_left, bottom_right = maps[1].display
    assert top_left[:5, :5].mean() > 0.9 and top_left[10:, 15:].max() < 0.1
    assert bottom_right[15:, 25:].mean() > 0.9 and bottom_right[:5, :5].max() < 0.1
    per_head = query_attention_maps(weights, (hf, wf), [(40, 60), (20, 30)], feature_padding_mask=mask, heads="none")
    assert per_head[0].raw.shape == (3, 2, 40, 60)


def test_point_maps_read_the_row_of_the_cell_under_each_point():
    hf, wf = 3, 4
    weights = torch.zeros(1, 1, hf * wf, hf * wf)
    weights[0, 0, torch.arange(hf * wf), (torch.arange(hf * wf) + 1) % (hf * wf)] = 1.0  # cell i attends to i+1
    maps = point_attention_maps(weights, [torch.tensor([[5.0, 5.0], [95.0, 5.0]])], (hf, wf), [(30, 100)])
    first, second = maps[0].raw
    assert first[:10, 25:50].mean() > 0.5  # point in cell (0, 0) attends to cell (0, 1)
    assert second[10:20, :25].mean() > 0.5  # cell (0, 3) attends to cell (1, 0)


def test_display_maps_span_zero_to_one_and_constant_maps_stay_dark():
    maps = torch.stack([torch.rand(5, 7) * 3 + 2, torch.full((5, 7), 0.4)])
    out = minmax_normalize(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert (out[1] == 0).all()


def test_detr_detections_get_cross_attention_and_rollout_maps_from_one_forward():
    torch.manual_seed(0)
    net = DETRNet(
        num_classes=2, backbone="resnet18", hidden_dim=32, num_queries=6, enc_layers=2, dec_layers=2,
        nheads=4, dim_feedforward=64, image_size=96, score_thresh=0.0,
    ).eval()
    names = transformer_attention_names(net)
    assert names["decoder_cross"][-1] == "decoder.layers.1.multihead_attn"
    images = [torch.rand(3, 96, 64), torch.rand(3, 48, 96)]  # different sizes: padding
    grid = {}
    net.input_proj.register_forward_hook(lambda m, a, o: grid.update(hw=tuple(o.shape[-2:])))
    with torch.no_grad(), AttentionCapture(net, names["encoder_self"] + names["decoder_cross"]) as cap:
        detections = net(images)
    hf, wf = grid["hw"]
    last = names["decoder_cross"][-1]
    padding = cap.key_padding_masks[last].view(2, hf, wf)
    queries = [torch.arange(d["boxes"].shape[0])[:3] for d in detections]
    sizes = [tuple(i.shape[-2:]) for i in images]

    cross = query_attention_maps(cap.weights[last], (hf, wf), sizes, queries, padding)
    rollout = attention_rollout([cap.weights[n] for n in names["encoder_self"]])
    traced = query_attention_maps(decoder_rollout(cap.weights[last], rollout), (hf, wf), sizes, queries, padding)

    for maps, size in zip(cross + traced, sizes + sizes):
        assert maps.raw.shape == (3, *size)
        assert maps.display.min() >= 0 and maps.display.max() <= 1
        assert torch.isfinite(maps.raw).all()
    # Image 1 is padded at the bottom: its queries put no weight on padding cells.
    assert cap.weights[last][1][..., padding[1].flatten()].abs().max() == 0
