"""Per-detection maps: the fast paths are exact, the maps are well-formed in every corner case,
and the other explainers (EigenCAM, input gradient, feature grid, D-RISE) and the fixed scale behave."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detlens.adapters import adapter_for
from detlens.adapters.base import AdapterOutput
from detlens.data import SyntheticDataModule
from detlens.explainers.api import box_focus, explain, focus_summary
from detlens.explainers.cams import feature_grid
from detlens.explainers.drise import MAX_MASKS
from detlens.explainers.gradcam import gradcam
from detlens.explainers.metrics import pointing_game
from detlens.explainers.scale import FixedScale, display_maps, flat_maps
from detlens.focus.record import downsample_maps
from detlens.lightning_modules import DETR, TorchvisionDetector

SIZE = 64


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # tests/conftest.py


def faster_rcnn(num_classes: int = 4) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=num_classes, min_size=SIZE, max_size=SIZE, fpn_channels=16,
        representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20, box_batch_size_per_image=16,
        anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, attention_stage="layer3",
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Faster R-CNN (with an attention block) trained ~10 s on synthetic scenes, and 3 validation items."""
    torch.set_num_threads(1)
    dm = SyntheticDataModule(
        root=str(tmp_path_factory.mktemp("scenes") / "s"), num_train=16, num_val=3, image_size=SIZE, horizontal_flip=False
    )
    torch.manual_seed(0)
    module = faster_rcnn(dm.num_classes)
    net = module.model.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3)
    items = [dm.train_dataset[i] for i in range(16)]
    for step in range(30):
        batch = items[(step * 4) % 16 : (step * 4) % 16 + 4]
        losses = net([im for im, _ in batch], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in batch])
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    module.eval()
    return module, [dm.val_dataset[i] for i in range(3)]


def negated(out: AdapterOutput) -> AdapterOutput:
    """The same forward, explaining minus each detection's score and box (same graph).

    Grad-CAM's ReLU keeps one sign of ``sum_c alpha_c A_c``; which sign a given detection
    shows depends on the weights, so the exactness tests explain both signs: every
    detection whose score sees the layer then has a non-zero map under one of them.
    """
    dets = [replace(d, score_graph=-d.score_graph, box_graph=None if d.box_graph is None else -d.box_graph)
            for d in out.detections]
    if out.roi is None:
        return replace(out, detections=dets)
    scores = out.roi.score_fn  # the two-stage fast path re-scores the pooled RoIs: negate that too

    def negated_scores(*args):  # type: ignore[no-untyped-def]
        probs, boxes = scores(*args)
        return -probs, None if boxes is None else -boxes

    return replace(out, detections=dets, roi=replace(out.roi, score_fn=negated_scores))


def assert_every_detection_sees_the_layer(maps_plus: list[torch.Tensor], maps_minus: list[torch.Tensor]) -> None:
    """Per detection, the map of the score or of its negation is non-zero (the layer is on the graph)."""
    for plus, minus in zip(maps_plus, maps_minus):
        seen = plus.flatten(1).amax(1).clamp_min(0) + minus.flatten(1).amax(1).clamp_min(0)
        assert bool((seen > 0).all()), f"maps must see the layer (it is on every score's graph): {seen.tolist()}"


def assert_same_maps(fast: list[torch.Tensor], slow: list[torch.Tensor], tol: float = 1e-5) -> None:
    """Equal to ``tol`` relative to each reference map's peak (raw maps are ~1e-4 in absolute terms)."""
    for f, s in zip(fast, slow):
        assert f.shape == s.shape
        peak = s.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
        assert float(((f - s).abs() / peak).max()) <= tol


@pytest.mark.parametrize("weighting", ["gradcam", "elementwise", "layercam"])
@pytest.mark.parametrize("target", ["class", "box", "both"])
def test_two_stage_fast_path_equals_one_backward_per_detection_on_a_trained_model(trained, weighting, target):
    module, items = trained
    out = adapter_for(module).run([im for im, _ in items], ["features"], top_k=8)
    counts = [len(d) for d in out.detections]
    assert sum(counts) >= 8, f"the trained model should detect something, got {counts}"
    assert out.roi is not None
    slows = []
    for explained in (out, negated(out)):
        fast = gradcam(explained, "features", target=target, weighting=weighting, fast=True)
        slow = gradcam(explained, "features", target=target, weighting=weighting, fast=False)
        assert_same_maps(fast, slow)
        slows.append(slow)
    assert_every_detection_sees_the_layer(*slows)


@pytest.mark.parametrize("name, layer", [("fasterrcnn", "backbone.body.layer3_attention"), ("retinanet", "features"), ("detr", "encoder.layers.0")])
def test_vectorised_backward_equals_the_per_detection_loop(trained, name, layer):
    torch.manual_seed(0)
    if name == "fasterrcnn":
        module = trained[0]
    elif name == "retinanet":
        module = TorchvisionDetector("retinanet_resnet18_fpn", num_classes=4, min_size=SIZE, max_size=SIZE, fpn_channels=16,
                                     anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0)
    else:
        module = DETR(num_classes=4, backbone="resnet18", backbone_stage="layer3", hidden_dim=32, num_queries=10,
                      enc_layers=1, dec_layers=1, nheads=2, dim_feedforward=64, image_size=SIZE, score_thresh=0.0)
    images = [im for im, _ in trained[1][:2]]
    out = adapter_for(module).run(images, [layer], top_k=4)
    assert sum(len(d) for d in out.detections) > 0, "score_thresh=0.0: every model detects something"
    for target in ("class", "both"):
        slows = []
        for explained in (out, negated(out)):
            fast = gradcam(explained, layer, target=target, fast=True)
            slow = gradcam(explained, layer, target=target, fast=False)
            assert_same_maps(fast, slow)
            slows.append(slow)
        assert_every_detection_sees_the_layer(*slows)
    for weighting in ("elementwise", "layercam"):
        assert_same_maps(gradcam(out, layer, weighting=weighting, fast=True), gradcam(out, layer, weighting=weighting, fast=False))


def test_layercam_weighs_each_position_by_its_positive_gradients_only(trained):
    """LayerCAM = ReLU(sum_c ReLU(dS/dA_c) * A_c), from the detection's own backward; where the
    gradient has negative entries on positive activations it differs from gradient x activation."""
    module, items = trained
    layer = "backbone.body.layer3_attention"
    out = adapter_for(module).run([items[0][0]], [layer], top_k=3)
    assert len(out.detections[0]) == 3
    maps = gradcam(out, layer, weighting="layercam")[0]
    elementwise = gradcam(out, layer, weighting="elementwise")[0]
    act = out.activations[layer]
    for d in range(3):
        (g,) = torch.autograd.grad(out.detections[0].score_graph[d], act, retain_graph=True)
        assert bool(((g < 0) & (act > 0)).any()), "the test needs negative gradients on active positions"
        expected = (g[0].clamp_min(0) * act[0].detach()).sum(0).clamp_min(0)
        assert_same_maps(maps[d : d + 1], out.to_image(expected[None], 0))
        assert float((maps[d] - elementwise[d]).abs().max()) > 1e-3 * float(maps[d].max())


@pytest.mark.parametrize("method", ["gradcam", "elementwise", "layercam", "input_gradient", "eigencam", "drise"])
def test_explaining_k_detections_runs_the_backbone_once(trained, method):
    module, items = trained
    calls = []
    handle = module.model.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = explain(module, [im for im, _ in items], method=method, top_k=8, num_masks=8, mask_batch_size=4)
    finally:
        handle.remove()
    assert sum(len(e) for e in out) >= 8
    # one forward for all detections; D-RISE adds one per batch of masked images per image
    assert len(calls) == (1 + 3 * 2 if method == "drise" else 1)


METHODS = ["gradcam", "elementwise", "layercam", "eigencam", "input_gradient", "feature_grid", "drise"]


def check_maps(explanations, sizes):
    for e, (h, w) in zip(explanations, sizes):
        assert e.maps.shape[-2:] == (h, w) and e.raw.shape == e.maps.shape
        assert torch.isfinite(e.maps).all() and torch.isfinite(e.raw).all()
        assert bool((e.maps >= 0).all() and (e.maps <= 1).all() and (e.raw >= 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_finite_and_in_unit_range_for_gray_non_square_images_under_bf16(trained, method):
    module, items = trained
    gray = items[0][0].mean(0, keepdim=True)  # [1, 64, 64]
    wide = torch.nn.functional.interpolate(items[1][0][None], size=(40, 72), mode="bilinear")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = explain(module, [gray, wide], method=method, target="both" if method != "eigencam" else "class",
                      top_k=3, num_masks=8)
    check_maps(out, [(64, 64), (40, 72)])
    if method != "feature_grid":
        assert all(len(e) == 3 and e.maps.shape[0] == 3 for e in out)
        for e in out:  # display maps span [0, 1] exactly, but for flat ones, which are blank
            flat = flat_maps(e.raw)
            assert bool((e.maps[flat] == 0).all())
            assert all(float(m.amax()) == 1.0 and float(m.amin()) == 0.0 for m in e.maps[~flat])
    assert module.training is False and all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_no_detections_give_empty_maps(trained, method):
    module, items = trained
    out = explain(module, [items[0][0]], method=method, score_threshold=0.999999, num_masks=4)
    assert len(out[0]) == 0
    if method != "feature_grid":
        assert out[0].maps.shape == (0, SIZE, SIZE)
    check_maps(out, [(SIZE, SIZE)])


@pytest.mark.parametrize("constant", [2.0, -2.0, 0.0])
@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_constant_activations_give_blank_finite_maps(trained, method, constant):
    """A layer whose activations are spatially constant gives Grad-CAM and EigenCAM maps without
    spatial information (the element-wise method keeps the gradients' layout, so it is not
    flat); whatever their sign, they are drawn blank, flagged flat and left out of the focus
    metrics."""
    module, items = trained
    layer = module.model.backbone.body.layer4
    handle = layer.register_forward_hook(lambda m, a, out: torch.full_like(out, constant) + 0 * out)
    try:
        (e,) = explain(module, [items[0][0]], method=method, layer="backbone.body.layer4", top_k=3)
    finally:
        handle.remove()
    assert len(e) == 3
    assert torch.isfinite(e.maps).all() and not e.maps.any(), "constant maps are drawn blank"
    assert torch.isfinite(e.raw).all() and bool(flat_maps(e.raw).all())
    focus = box_focus(e, e.boxes, e.labels)  # every detection its own ground truth: all true positives
    assert bool(focus["is_tp"].all()) and bool(focus["flat"].all())
    assert torch.isnan(focus["energy_in_box"]).all() and torch.isnan(focus["pointing_game"]).all()
    assert not pointing_game(e.raw, e.boxes).any(), "a flat map has no maximum to point with"
    summary = focus_summary([focus], [e.labels])
    assert summary["flat_map_rate"] == 1.0 and "energy_in_box" not in summary


@pytest.mark.parametrize("constant", [3.0, -3.0, 0.0, 1e6])
def test_flat_maps_are_blank_in_display_scale_and_record(constant):
    """Positive, negative and zero constants, also with float32 resampling noise, are flat."""
    maps = torch.full((2, 5, 7), constant)
    maps[1] *= 1 + 1e-7 * torch.randn(5, 7, generator=torch.Generator().manual_seed(0))  # a few ulps
    assert bool(flat_maps(maps).all())
    assert display_maps(maps).abs().max() == 0
    stored, _ = downsample_maps(maps.clamp_min(0), size=4)
    assert not stored.any()
    scale = FixedScale()
    assert scale("gradcam/x", [maps.clamp_min(0)]) is None, "flat maps never fix the scale"
    contrast = maps.clone()
    contrast[:, 0, 0] += 1.0 + 0.01 * abs(constant)
    assert not flat_maps(contrast).any() and float(display_maps(contrast).amax()) == 1.0


def test_box_focus_scores_true_positives_against_their_ground_truth_box(trained):
    module, items = trained
    (e,) = explain(module, [items[0][0]], method="gradcam", top_k=3)
    assert len(e) == 3
    # The model's maps plus a ramp: never flat, whatever the weights made of the Grad-CAM.
    ramp = torch.linspace(0.0, 1.0, SIZE).expand(SIZE, SIZE)
    e = replace(e, raw=e.raw + ramp)
    # The ground truth of detection 0 (the highest score, so matched first): its box shrunk
    # by 5% of its size on each side, inside the image wherever the detection lies; IoU 0.81.
    box = e.boxes[0]
    inset = 0.05 * torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2) * torch.tensor([1.0, 1.0, -1.0, -1.0])
    gt_boxes, gt_labels = (box + inset)[None], e.labels[:1]
    focus = box_focus(e, gt_boxes, gt_labels)
    assert focus["is_tp"].tolist()[0] is True
    from detlens.explainers.metrics import energy_in_box

    assert float(focus["energy_in_box"][0]) == pytest.approx(float(energy_in_box(e.raw[:1], gt_boxes)[0]))
    box = gt_boxes[0]
    area = float((box[2] - box[0]) * (box[3] - box[1])) / SIZE**2
    assert float(focus["chance"][0]) == pytest.approx(area, rel=1e-5)
    others = ~focus["is_tp"]
    assert torch.isnan(focus["energy_in_box"][others]).all() and torch.isnan(focus["pointing_game"][others]).all()


def test_wrong_layer_names_are_explained(trained):
    module, items = trained
    with pytest.raises(ValueError, match=r"Closest: 'backbone\.body\.layer4'"):
        explain(module, [items[0][0]], layer="backbone.body.layer_4")
    with pytest.raises(ValueError, match="feature_grid needs one feature map"):
        explain(module, [items[0][0]], method="feature_grid", layer="features")
    with pytest.raises(ValueError, match="method must be one of"):
        explain(module, [items[0][0]], method="gradcam++")


def test_feature_grid_ranks_channels_by_mean_activation(trained):
    module, items = trained
    out = adapter_for(module).run([items[0][0]], ["backbone.body.layer2"], with_grad=False)
    ((channels, maps),) = feature_grid(out, "backbone.body.layer2", k=5)
    act = out.activations["backbone.body.layer2"][0]
    assert torch.equal(channels, act.mean(dim=(1, 2)).argsort(descending=True)[:5])
    assert maps.shape == (5, SIZE, SIZE)


def test_drise_is_reproducible_bounded_and_points_at_the_detection(trained):
    module, items = trained
    kwargs = dict(method="drise", top_k=2, num_masks=64, mask_batch_size=32)
    a = explain(module, [items[0][0]], seed=3, **kwargs)[0]
    b = explain(module, [items[0][0]], seed=3, **kwargs)[0]
    c = explain(module, [items[0][0]], seed=4, **kwargs)[0]
    assert torch.equal(a.raw, b.raw) and not torch.equal(a.raw, c.raw)
    with pytest.raises(ValueError, match="num_masks must be in"):
        explain(module, [items[0][0]], method="drise", num_masks=MAX_MASKS + 1)


def test_fixed_scale_keeps_the_first_reference_and_survives_a_checkpoint():
    scale = FixedScale()
    first = [torch.tensor([[[0.0, 2.0]], [[4.0, 1.0]]]), torch.zeros(0, 1, 2)]
    assert scale("gradcam/features", [torch.zeros(1, 1, 2)]) is None, "blank maps do not fix the scale"
    scaled = scale("gradcam/features", first, step=10)
    assert scale.reference("gradcam/features") == pytest.approx(3.0)
    assert torch.allclose(scaled[0], first[0] / 3.0)
    later = scale("gradcam/features", [first[0] * 2], step=20)
    assert float(later[0].amax()) == pytest.approx(8 / 3), "drift shows: the normaliser does not follow"
    restored = FixedScale()
    restored.load_state_dict(scale.state_dict())
    assert restored.reference("gradcam/features") == pytest.approx(3.0)


def test_gradcam_fails_the_model_randomisation_sanity_check_only_when_it_should(trained):
    """Adebayo et al.'s check on a trained detector: Grad-CAM must change when the weights do.

    A randomised detector finds other boxes, so each image's maps are compared as one
    image-level map (the element-wise max over its top detections' raw maps).
    """
    from detlens.explainers.api import explain
    from detlens.explainers.metrics import randomisation_check

    module, items = trained
    images = [image for image, _ in items]

    def image_maps(net: torch.nn.Module) -> list[torch.Tensor]:
        explanations = explain(net, images, method="gradcam", target="class", top_k=5, score_threshold=0.0)
        return [ex.raw.amax(0, keepdim=True) if len(ex) else torch.zeros(1, *img.shape[-2:]) for ex, img in zip(explanations, images)]

    before = [p.detach().clone() for p in module.model.parameters()]
    rng = torch.get_rng_state()

    full = randomisation_check(module.model, image_maps, mode="full", seed=0)
    cascading = randomisation_check(
        module.model, image_maps, mode="cascading", stages=["roi_heads", "rpn", "backbone"], seed=0
    )

    print(f"\nGrad-CAM randomisation check, Spearman per image: full {full.correlations.tolist()}, "
          f"cascading mean |rho| per stage {dict(zip(cascading.stages, cascading.mean_abs.tolist()))}")
    assert float(full.mean_abs[0]) < 0.5  # the maps depend on the weights
    assert float(cascading.mean_abs[-1]) < 0.5
    # and a map that ignores the model passes as "not honest": correlation 1
    constant = randomisation_check(module.model, lambda net: [img.mean(0, keepdim=True) for img in images], mode="full")
    assert torch.allclose(constant.correlations, torch.ones_like(constant.correlations))
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
