"""The generic dense-head adapter on a small network of its own (no third-party detector):
decoding of plain and distribution (DFL) distances, softmax and sigmoid scores, origins and box
features, and the exact fast path on every layer kind, the fused neck layer included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import detlens
from detlens.adapters.dense_head import DenseHeadAdapter, DenseLevels, decode_distances
from detlens.explainers.gradcam import gradcam

pytestmark = [pytest.mark.usefixtures("one_thread")]


class TinyDense(nn.Module):
    """Two levels (strides 8 and 16), 3 classes, ``bins`` bins per box side."""

    def __init__(self, bins: int, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.p3 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.p4 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU())
        self.cls = nn.ModuleList([nn.Conv2d(12, classes, 1), nn.Conv2d(16, classes, 1)])
        self.reg = nn.ModuleList([nn.Conv2d(12, 4 * bins, 1), nn.Conv2d(16, 4 * bins, 1)])


class TinyDenseAdapter(DenseHeadAdapter):
    def strides(self):
        return [8.0, 16.0]

    def module_layers(self):
        return ["stem", "p3", "p4"]

    def dense_forward(self, batch):
        m = self.model
        p3 = m.p3(m.stem(batch))
        p4 = m.p4(p3)
        feats = [p3, p4]
        return DenseLevels([c(f) for c, f in zip(m.cls, feats)], [r(f) for r, f in zip(m.reg, feats)], feats, self.strides())


def build(bins: int, activation: str) -> TinyDenseAdapter:
    torch.manual_seed(0)
    adapter = TinyDenseAdapter(TinyDense(bins, classes=4 if activation == "softmax" else 3))
    adapter.score_activation = activation
    adapter.candidate_threshold = 0.0
    return adapter


def test_distribution_distances_are_the_expected_bin():
    logits = torch.full((1, 4 * 5), -1e4)
    for side, b in enumerate([0, 1, 3, 4]):
        logits[0, side * 5 + b] = 0.0
    torch.testing.assert_close(decode_distances(logits, 5), torch.tensor([[0.0, 1.0, 3.0, 4.0]]))


@pytest.mark.parametrize(("bins", "activation"), [(1, "sigmoid"), (8, "sigmoid"), (1, "softmax")])
def test_detections_decode_their_own_anchor(bins, activation):
    adapter = build(bins, activation)
    image = torch.rand(3, 48, 80)
    out = adapter.run([image], ["neck"], top_k=20)
    det = out.detections[0]
    assert len(det) == 20 and torch.equal(det.scores, det.score_graph.detach())
    assert bool((det.scores[:-1] >= det.scores[1:]).all())
    levels = adapter.dense_forward(adapter.preprocess(out.inputs))  # padded to 48 x 80 (multiple of 16)
    sizes = [x.shape[-2] * x.shape[-1] for x in levels.cls_logits]
    for d in range(len(det)):
        a = int(det.origin[d])
        lvl = 0 if a < sizes[0] else 1
        assert det.level[d] == ["P3", "P4"][lvl]
        local = a - (0 if lvl == 0 else sizes[0])
        w = levels.cls_logits[lvl].shape[-1]
        y, x = divmod(local, w)
        logits = levels.cls_logits[lvl][0, :, y, x]
        probs = (logits.sigmoid() if activation == "sigmoid" else logits.softmax(0)[:-1]).detach()
        torch.testing.assert_close(det.class_probs[d], probs)
        assert int(det.labels[d]) == int(probs.argmax()) and float(det.scores[d]) == pytest.approx(float(probs.max()), rel=1e-6)
        s = adapter.strides()[lvl]
        dist = decode_distances(levels.box_regression[lvl][0, :, y, x][None], bins)[0] * s
        cx, cy = (x + 0.5) * s, (y + 0.5) * s
        box = torch.stack([cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]])
        box = torch.stack([box[0].clamp(0, 80), box[1].clamp(0, 48), box[2].clamp(0, 80), box[3].clamp(0, 48)])
        torch.testing.assert_close(det.boxes[d], box.detach(), rtol=1e-5, atol=1e-4)
        feat = levels.head_inputs[lvl][0, :, y, x].detach()
        torch.testing.assert_close(det.features[d, : feat.shape[0]], feat)
        assert bool((det.features[d, feat.shape[0] :] == 0).all())


@pytest.mark.parametrize("layer", ["neck", "neck_fused", "neck/P4", "stem"])
@pytest.mark.parametrize("weighting", ["gradcam", "elementwise", "layercam"])
def test_fast_path_equals_the_per_detection_loop(layer, weighting):
    adapter = build(8, "sigmoid")
    out = adapter.run([torch.rand(3, 48, 80), torch.rand(3, 32, 32)], [layer], top_k=5)
    for target in ("class", "both"):
        fast = gradcam(out, layer, target=target, weighting=weighting, fast=True)
        slow = gradcam(out, layer, target=target, weighting=weighting, fast=False)
        for f, s in zip(fast, slow):
            peak = s.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
            assert float(((f - s).abs() / peak).max()) <= 1e-5


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam", "input_gradient"])
def test_gray_non_square_and_empty(method):
    adapter = build(1, "softmax")
    out = detlens.explain(adapter.model, [torch.rand(1, 40, 72), torch.rand(3, 72, 40)], method=method,
                          layer="neck_fused" if method != "input_gradient" else None, top_k=3, adapter=adapter)
    for e, size in zip(out, [(40, 72), (72, 40)]):
        assert e.raw.shape == (3, *size) and torch.isfinite(e.raw).all()
    (none,) = detlens.explain(adapter.model, [torch.rand(3, 40, 72)], method=method, score_threshold=1.0, adapter=adapter)
    assert none.raw.shape == (0, 40, 72)
