"""Decision-boundary margins: every reported loss is real, budgets nest, the attack is batched, every family works."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from detlens.adapters import adapter_for
from detlens.data import SyntheticDataModule
from detlens.explainers.api import explain
from detlens.explainers.boundary import boundary
from detlens.lightning_modules import DETR, TorchvisionDetector

SIZE = 64

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # tests/conftest.py


def faster_rcnn(num_classes: int) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=num_classes, min_size=SIZE, max_size=SIZE, fpn_channels=16,
        representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20, box_batch_size_per_image=16,
        anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Faster R-CNN trained a few seconds on synthetic scenes, 4 of its training images, and a score
    threshold just under its 8th most confident detection on them (so there are detections to attack)."""
    torch.set_num_threads(1)
    dm = SyntheticDataModule(
        root=str(tmp_path_factory.mktemp("scenes") / "s"), num_train=16, num_val=2, image_size=SIZE, horizontal_flip=False
    )
    torch.manual_seed(0)
    module = faster_rcnn(dm.num_classes)
    net = module.model.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3)
    items = [dm.train_dataset[i] for i in range(16)]
    for step in range(40):
        batch = items[(step * 4) % 16 : (step * 4) % 16 + 4]
        losses = net([im for im, _ in batch], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in batch])
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    module.eval()
    images = [im for im, _ in items[:4]]
    scores = torch.cat([d.scores for d in adapter_for(module).run(images, top_k=4, with_grad=False).detections])
    return module, images, float(scores.sort(descending=True).values[7]) * 0.999


def attacked(module, images, threshold, top_k=4):
    adapter = adapter_for(module)
    found = adapter.run(images, top_k=top_k, score_threshold=threshold, with_grad=False).detections
    return adapter, found


def still_there(found_boxes, found_scores, found_labels, box, label, threshold) -> bool:
    keep = (found_scores > threshold) & (found_labels == label)
    if not bool(keep.any()):
        return False
    return bool((box_iou(found_boxes[keep].float(), box[None].float())[:, 0] >= 0.5).any())


def assert_losses_are_real(module, results, threshold, own_forward: bool) -> int:
    """Re-runs the detector on each returned perturbed image alone; returns the number of losses."""
    adapter = adapter_for(module)
    lost = 0
    for r in results:
        assert r.margin.shape == r.lost.shape == r.flipped_to.shape == (len(r),)
        assert r.delta_map.shape[0] == len(r) and r.perturbed.shape[0] == len(r)
        assert bool((r.perturbed >= 0).all() and (r.perturbed <= 1).all())
        for d in range(len(r)):
            if not bool(r.lost[d]):
                assert math.isnan(float(r.margin[d])) and int(r.flipped_to[d]) == -1
                continue
            lost += 1
            m = float(r.margin[d])
            assert math.isfinite(m) and 0.0 <= m <= r.epsilon * (1 + 1e-6)
            image = r.perturbed[d]
            found = adapter.run([image], score_threshold=threshold, with_grad=False).detections[0]
            assert not still_there(found.boxes, found.scores, found.labels, r.boxes[d], int(r.labels[d]), threshold)
            if own_forward:  # the model's own eval forward, not detlens' adapter
                module.model.eval()
                with torch.no_grad():
                    (own,) = module.model([image])
                assert not still_there(own["boxes"], own["scores"], own["labels"], r.boxes[d], int(r.labels[d]), threshold)
    return lost


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_every_reported_loss_is_lost_when_the_detector_is_rerun_on_the_perturbed_image(trained, norm):
    module, images, threshold = trained
    adapter, found = attacked(module, images, threshold)
    assert sum(len(f) for f in found) >= 4, "the fixture must give detections to attack"
    results = boundary(adapter, images, found, norm=norm, steps=15, score_threshold=threshold)
    lost = assert_losses_are_real(module, results, threshold, own_forward=True)
    assert lost >= 1
    # margin is the norm of the returned perturbation
    for r, image in zip(results, images):
        for d in torch.nonzero(r.lost).flatten().tolist():
            delta = (r.perturbed[d] - image).double()
            expected = delta.abs().max() if norm == "linf" else delta.pow(2).mean().sqrt()
            assert float(r.margin[d]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert module.training is False and all(p.grad is None for p in module.parameters())


def test_a_smaller_step_budget_only_turns_losses_into_not_lost(trained):
    module, images, threshold = trained
    adapter, found = attacked(module, images, threshold)

    def run(steps):
        return boundary(adapter, images, found, norm="l2", steps=steps, epsilon=0.05, step_size=0.0005,
                        score_threshold=threshold)

    large = run(16)
    at = sorted({int(s) for r in large for s in r.lost_at_step[r.lost].tolist()})
    assert len(at) >= 2, f"the test needs losses at different steps, got steps {at}"
    small = run(at[0])  # a budget that ends where the first losses happen: the later ones must become "not lost"
    counts = [sum(int(r.lost.sum()) for r in res) for res in (small, large)]
    assert counts[0] < counts[1]
    for a, b in zip(small, large):
        assert bool((a.lost <= b.lost).all()), "a loss under the smaller budget must stay a loss"
        # the shorter attack is a prefix of the longer: same margins where both lost
        both = a.lost & b.lost
        assert torch.equal(a.margin[both], b.margin[both]) and torch.equal(a.lost_at_step[both], b.lost_at_step[both])
        assert bool((a.lost_at_step[a.lost] <= at[0]).all())


def test_all_detections_of_an_image_are_attacked_in_one_batched_forward_per_step(trained):
    module, images, _ = trained
    adapter, found = attacked(module, images[:1], threshold=0.05, top_k=6)
    k = len(found[0])
    assert k >= 3
    calls = []
    handle = module.model.backbone.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        (res,) = boundary(adapter, images[:1], found, norm="l2", steps=6, score_threshold=0.05)
    finally:
        handle.remove()
    # steps + 1 batched forwards of the still-active copies; one forward of one image per verified loss
    batched = [c for c in calls if c > 1]
    assert calls[0] == k and len(batched) <= 7 and len(calls) <= 7 + k
    # the per-detection reference loop (same attack, one detection at a time) finds the same losses
    ref = boundary(adapter, images[:1], found, norm="l2", steps=6, score_threshold=0.05, batched=False)[0]
    assert torch.equal(res.lost, ref.lost)
    assert torch.allclose(res.margin[res.lost], ref.margin[ref.lost], atol=2e-3)


def test_bf16_autocast_and_inference_mode(trained):
    module, images, threshold = trained
    adapter, found = attacked(module, images[:2], threshold)
    rng = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = boundary(adapter, images[:2], found, norm="linf", steps=8, score_threshold=threshold)
        assert torch.equal(torch.random.get_rng_state(), rng), "the attack draws no random numbers"
        lost = assert_losses_are_real(module, results, threshold, own_forward=False)
    assert all(torch.isfinite(r.delta_map).all() for r in results)
    assert lost >= 1
    with torch.inference_mode():  # a validation loop: inference tensors in, results out
        frozen = [im.clone() for im in images[:2]]
        under = boundary(adapter, frozen, found, norm="l2", steps=5, score_threshold=threshold)
    plain = boundary(adapter, images[:2], found, norm="l2", steps=5, score_threshold=threshold)
    for a, b in zip(under, plain):
        assert torch.equal(a.lost, b.lost) and torch.equal(a.margin.nan_to_num(-1), b.margin.nan_to_num(-1))


def test_explain_boundary_gives_delta_maps_and_margins(trained):
    module, images, threshold = trained
    out = explain(module, images[:2], method="boundary", top_k=3, score_threshold=threshold, steps=6)
    for e in out:
        assert e.boundary is not None and e.raw.shape == (len(e), SIZE, SIZE)
        assert torch.equal(e.raw, e.boundary.delta_map.clamp_min(0))
    with pytest.raises(ValueError, match="score_threshold"):
        explain(module, images[:1], method="boundary", score_threshold=0.0)


def tv(arch: str) -> TorchvisionDetector:
    torch.manual_seed(0)
    # resized to 160 px: FCOS' GroupNorm needs more than one value per group on its coarsest (P7) level
    return TorchvisionDetector(arch, num_classes=3, min_size=160, max_size=160, fpn_channels=32,
                               anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0)


def detr() -> DETR:
    torch.manual_seed(0)
    return DETR(num_classes=3, backbone="resnet18", backbone_stage="layer3", hidden_dim=32, num_queries=12,
                enc_layers=1, dec_layers=1, nheads=2, dim_feedforward=64, image_size=SIZE, score_thresh=0.0)


@pytest.mark.parametrize("make", [lambda: tv("retinanet_resnet18_fpn"), lambda: tv("fcos_resnet18_fpn"), detr],
                         ids=["retinanet", "fcos", "detr"])
def test_one_stage_and_detr_losses_are_verified(trained, make):
    module = make().eval()
    _, images, _ = trained
    adapter = adapter_for(module)
    # an untrained detector: attack its three most confident detections per image
    top = adapter.run(images[:2], top_k=3, with_grad=False).detections
    threshold = float(min(float(d.scores.min()) for d in top)) * 0.999
    found = [d.select(torch.nonzero(d.scores > threshold).flatten()) for d in top]
    results = boundary(adapter, images[:2], found, norm="linf", steps=6, score_threshold=threshold)
    assert sum(len(r) for r in results) >= 2
    lost = assert_losses_are_real(module, results, threshold, own_forward=not isinstance(module, DETR))
    assert lost >= 1
