"""Rendering: attention overlays with the detection's box, and the entropy heatmap."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from detlens.render.attention import entropy_heatmap, overlay_attention
from detlens.render.boxes import class_color


def test_overlay_blends_the_map_and_draws_the_box_in_the_class_colour():
    image = torch.full((3, 40, 60), 0.5)
    attention = torch.zeros(10, 15)
    attention[:5, :7] = 1.0  # small map: resized to the image
    out = overlay_attention(image, attention, box=(30, 20, 55, 38), label=2, score=0.9, alpha=0.6)
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    hot, cold = out[5, 5].astype(int), out[35, 5].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # JET: high = red, low = blue (RGB order)
    edge = np.abs(out[30, 55].astype(int) - np.array(class_color(2))).max()
    assert edge < 16  # right edge of the box, in the class colour (anti-aliased)


def test_overlay_rejects_maps_that_are_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        overlay_attention(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8)))


def test_entropy_heatmap_is_an_rgb_image_and_leaves_no_figure_open():
    before = plt.get_fignums()
    img = entropy_heatmap(
        {"encoder.layers.0.self_attn": torch.tensor([0.9, 0.8, 0.2, 0.5]), "decoder.layers.0.multihead_attn": torch.rand(4)},
        title="attention entropy, step 100",
    )
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 50 and img.shape[1] > 100
    assert img.std() > 10  # not a blank canvas
    assert plt.get_fignums() == before


def test_entropy_heatmap_refuses_nothing_to_draw():
    with pytest.raises(ValueError, match="empty"):
        entropy_heatmap({})
