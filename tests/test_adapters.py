"""Adapters: one forward gives the model's own detections, differentiable scores, their origin and target layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detlens.adapters import adapter_for
from detlens.adapters.detr import DetrAdapter
from detlens.adapters.one_stage import OneStageAdapter
from detlens.adapters.two_stage import TwoStageAdapter
from detlens.lightning_modules import DETR, TorchvisionDetector

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tv(arch: str, **kw) -> TorchvisionDetector:
    torch.manual_seed(0)
    return TorchvisionDetector(
        arch, num_classes=NUM_CLASSES, min_size=64, max_size=96, fpn_channels=32, representation_size=32,
        rpn_proposals_test=30, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, **kw,
    )


def detr() -> DETR:
    torch.manual_seed(0)
    return DETR(
        num_classes=NUM_CLASSES, backbone="resnet18", backbone_stage="layer3", hidden_dim=32, num_queries=12,
        enc_layers=1, dec_layers=2, nheads=2, dim_feedforward=64, image_size=64, score_thresh=0.0,
    )


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 80, generator=g)]


MODELS = {
    "fasterrcnn+attention": lambda: tv("fasterrcnn_resnet18_fpn", attention_stage="layer3"),
    "retinanet": lambda: tv("retinanet_resnet18_fpn"),
    "fcos": lambda: tv("fcos_resnet18_fpn"),
    "detr": detr,
}
KINDS = {"fasterrcnn+attention": TwoStageAdapter, "retinanet": OneStageAdapter, "fcos": OneStageAdapter, "detr": DetrAdapter}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_adapter_returns_the_models_own_detections_with_differentiable_scores(name):
    module = MODELS[name]()
    adapter = adapter_for(module)  # the LightningModule is unwrapped to its network
    assert isinstance(adapter, KINDS[name]) and adapter.model is module.model
    layer = adapter.layer_names()[-1] if name == "detr" else "backbone.body.layer3"
    out = adapter.run(images(), [layer], top_k=6)

    module.eval()
    with torch.no_grad():
        reference = module(images())
    for det, ref, geom, image in zip(out.detections, reference, out.geometry, images()):
        assert 1 <= len(det) <= 6
        torch.testing.assert_close(det.scores, ref["scores"][: len(det)], rtol=0, atol=1e-6)
        torch.testing.assert_close(det.boxes, ref["boxes"][: len(det)], rtol=0, atol=1e-4)
        assert torch.equal(det.labels, ref["labels"][: len(det)])
        assert geom.original_size == tuple(image.shape[-2:])
        # the graph score equals the reported score and reaches the captured layer and the input
        torch.testing.assert_close(det.score_graph.detach().float(), det.scores.float())
        assert det.box_graph is not None and det.box_graph.requires_grad
        assert len(det.level) == len(det) and det.features.shape[0] == len(det)
        assert det.class_probs.shape[0] == len(det)
    act = out.activations[layer]
    assert act.dim() == 4 and act.shape[0] == 2
    g_act, g_img = torch.autograd.grad(out.detections[1].score_graph[0], [act, out.inputs[1]])
    assert g_act[0].abs().sum() == 0, "image 1's score cannot depend on image 0's activations"
    assert g_act[1].abs().sum() > 0 and g_img.abs().sum() > 0


def test_two_stage_origins_name_the_proposal_and_the_pooled_level():
    module = tv("fasterrcnn_resnet18_fpn")
    out = adapter_for(module).run(images(), ["features"], top_k=5)
    pooled = set(module.model.roi_heads.box_roi_pool.featmap_names)
    assert out.roi is not None
    for i, det in enumerate(out.detections):
        assert set(det.level) <= pooled
        assert int(det.origin.max()) < 30  # an index among the RPN's proposals
        # the stored RoI output reproduces each detection's score through the box head alone
        probs, boxes = out.roi.score_fn(out.roi.pooled[i], det.labels, out.roi.rois[i], i)
        torch.testing.assert_close(probs.detach(), det.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(boxes.detach(), det.boxes, rtol=0, atol=1e-4)
    assert {n for n in out.activations} == {f"features/{k}" for k in pooled | {"pool"}}


def test_one_stage_origins_index_anchors_of_the_levels_reported():
    module = tv("retinanet_resnet18_fpn")
    out = adapter_for(module).run(images()[:1], ["features"], top_k=5)
    det = out.detections[0]
    sizes = [out.activations[f"features/{k}"].shape[-2:].numel() * 9 for k in ("0", "1", "p6", "p7", "pool") if f"features/{k}" in out.activations]
    assert int(det.origin.max()) < sum(sizes)
    assert set(det.level) <= {n.split("/", 1)[1] for n in out.activations}


def test_a_wrong_layer_name_lists_the_closest_valid_names():
    adapter = adapter_for(tv("fasterrcnn_resnet18_fpn", attention_stage="layer3"))
    with pytest.raises(ValueError, match=r"Unknown target layer 'backbone\.body\.layr3'.*Closest: 'backbone\.body\.layer3'") as err:
        adapter.run(images(), ["backbone.body.layr3"])
    assert "'features'" in str(err.value) and "'backbone.body.layer3_attention'" in str(err.value)
    with pytest.raises(ValueError, match=r"Closest: 'encoder\.layers\.0'"):
        adapter_for(detr()).run(images(), ["encoder.layer.0"])


def test_running_the_adapter_restores_modes_hooks_and_parameter_grads():
    module = tv("fcos_resnet18_fpn")
    module.train()
    before = {n: m.training for n, m in module.named_modules()}
    hooks = sum(len(m._forward_hooks) for m in module.modules())
    out = adapter_for(module).run(images(), ["backbone.body.layer2", "features"], top_k=3)
    torch.autograd.grad(out.detections[0].score_graph.sum(), out.activations["backbone.body.layer2"])
    assert {n: m.training for n, m in module.named_modules()} == before
    assert sum(len(m._forward_hooks) for m in module.modules()) == hooks
    assert all(p.grad is None for p in module.parameters())


def test_a_model_without_an_adapter_is_told_how_to_write_one():
    with pytest.raises(TypeError, match="subclass detlens.adapters.DetectorAdapter"):
        adapter_for(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_a_two_stage_model_whose_rpn_keeps_no_proposal_explains_to_empty_maps():
    """An untrained RPN can keep no proposal for a whole batch (seen at step 21 of a tiny fit):
    Grad-CAM then returns zero detections and zero maps, not an IndexError from the box decoder."""
    import detlens

    module = tv("fasterrcnn_resnet18_fpn").eval()
    module.model.rpn.score_thresh = 1.01  # sigmoid objectness never reaches it: no proposals
    out = detlens.explain(module, images(), method="gradcam", top_k=5)
    assert [len(e.boxes) for e in out] == [0, 0]
    assert [tuple(e.maps.shape) for e in out] == [(0, 64, 64), (0, 48, 80)]
