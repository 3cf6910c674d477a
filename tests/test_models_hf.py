"""Hugging Face ``transformers`` detectors (DETR family, dense and deformable attention) through detlens.

Every model is built from a small config with random weights (nothing is downloaded); the
tests construct what they check (placed sampling points, gradients of both signs) rather
than relying on a trained model.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_gradcam import assert_every_detection_sees_the_layer, assert_same_maps, negated

from detlens.adapters import HFDetrAdapter, adapter_for, find_network
from detlens.explainers.api import explain
from detlens.explainers.attention import AttentionUnavailable, EntropyMonitor, find_attention_modules
from detlens.explainers.gradcam import gradcam
from detlens.explainers.query_attention import detection_attention_maps, splat_deformable_attention
from detlens.lightning_modules import HFDetector
from detlens.lightning_modules.hf_detector import ARCHITECTURES, build_hf_detector, hf_inputs, hf_labels

NUM_LABELS = 4  # detlens' 3 synthetic classes + the unused id 0 (see HFDetector)
DENSE = ("detr", "conditional_detr", "yolos")


def small(architecture: str, attn_implementation: str = "eager", **extra) -> torch.nn.Module:
    """A ~1M-parameter model of ``architecture`` with random weights (seeded)."""
    torch.manual_seed(0)
    if architecture in ("rt_detr", "rt_detr_v2", "d_fine"):
        config = dict(d_model=32, encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32], num_queries=10)
    elif architecture == "rf_detr":
        config = dict(d_model=32, num_queries=10, decoder_ffn_dim=64)
    elif architecture == "yolos":
        config = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_detection_tokens=10)
    else:
        config = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)
    config.update(extra)
    return build_hf_detector(architecture, NUM_LABELS, config, attn_implementation).eval()


def images(architecture: str) -> list[torch.Tensor]:
    """A gray and an RGB image, non-square; of different sizes where the model takes a pixel mask."""
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(1, 64, 96, generator=g)
    rgb = torch.rand(3, 64, 96, generator=g) if architecture == "yolos" else torch.rand(3, 80, 64, generator=g)
    return [gray, rgb]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_model_is_recognised_and_explained_per_detection_by_every_method(architecture):
    model = small(architecture)
    adapter = adapter_for(model)
    assert isinstance(adapter, HFDetrAdapter)
    layer = adapter.default_layer()
    assert layer in adapter.layer_names()
    batch = images(architecture)
    for method in ("gradcam", "elementwise", "eigencam", "input_gradient", "drise"):
        explained = explain(model, batch, method=method, top_k=3, num_masks=8, mask_batch_size=4)
        assert len(explained) == 2
        for image, e in zip(batch, explained):
            assert len(e) == 3  # score_threshold 0: every query is a candidate
            assert e.maps.shape == (3, *image.shape[-2:]), method
            assert torch.isfinite(e.maps).all(), method
            assert e.maps.min() >= 0 and e.maps.max() <= 1 + 1e-6, method


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_backward_for_all_detections_equals_the_per_detection_loop(architecture):
    model = small(architecture)
    adapter = adapter_for(model)
    layer = adapter.default_layer()
    out = adapter.run(images(architecture), [layer], top_k=4)
    for target in ("class", "both"):
        slows = []
        for explained in (out, negated(out)):
            fast = gradcam(explained, layer, target=target, fast=True)
            slow = gradcam(explained, layer, target=target, fast=False)
            assert_same_maps(fast, slow)
            slows.append(slow)
        assert_every_detection_sees_the_layer(*slows)


@pytest.mark.parametrize("architecture", ["detr", "yolos"])
def test_encoder_token_layers_are_explained_on_the_feature_grid(architecture):
    model = small(architecture)
    adapter = adapter_for(model)
    tokens = [n for n in adapter.layer_names() if ".encoder.layer" in n]
    assert tokens, adapter.layer_names()[:10]
    out = adapter.run(images(architecture)[:1] * 2 if architecture == "yolos" else images(architecture), [tokens[-1]], top_k=2)
    grid = out.activations[tokens[-1]]
    assert grid.dim() == 4 and grid.shape[0] == 2
    maps = gradcam(out, tokens[-1])
    assert all(torch.isfinite(m).all() for m in maps)


def test_softmax_models_score_without_the_no_object_class_and_sigmoid_models_with_every_class():
    detr, deformable = small("detr"), small("deformable_detr")
    x = images("detr")
    for model, softmax in ((detr, True), (deformable, False)):
        out = adapter_for(model).run(x, [], top_k=None)
        d = out.detections[0]
        assert d.class_probs.shape[-1] == NUM_LABELS + (1 if softmax else 0)
        expected = d.class_probs[:, :NUM_LABELS].max(-1).values
        assert torch.allclose(d.scores, expected)
        assert torch.equal(d.origin.sort().values, torch.arange(10))  # one detection per query
        assert (d.boxes[:, 2:] <= torch.tensor([96.0, 64.0])).all()


def test_label_offset_maps_zero_based_model_ids_to_detlens_labels():
    model = small("detr")
    plain = HFDetrAdapter(model).run(images("detr"), [], top_k=5).detections[0]
    shifted = HFDetrAdapter(model, label_offset=1).run(images("detr"), [], top_k=5).detections[0]
    assert torch.equal(shifted.labels, plain.labels + 1)


# ---------------------------------------------------------------------------- deformable attention maps
def reference_splat(weights, locations, shapes):
    """The effective weights through grid_sample on one-hot value grids: ``[N, heads, sum h*w]``."""
    n, h = weights.shape[:2]
    parts = []
    for level, (gh, gw) in enumerate(shapes):
        basis = torch.eye(gh * gw).reshape(1, gh * gw, gh, gw)
        grid = locations[:, :, level].reshape(1, n * h, -1, 2) * 2 - 1
        sampled = F.grid_sample(basis, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        parts.append((sampled[0] * weights[:, :, level].reshape(1, n * h, -1)).sum(-1).T.reshape(n, h, gh * gw))
    return torch.cat(parts, -1)


def test_splat_puts_each_placed_points_weight_on_the_cells_it_samples():
    shapes = [(4, 6), (2, 3)]
    weights = torch.tensor([[[[0.5, 0.2], [0.3, 0.0]]]])  # [N=1, heads=1, L=2, P=2]
    locations = torch.tensor([[[[
        [(2 + 0.5) / 6, (1 + 0.5) / 4],  # level 0: the centre of cell (row 1, col 2)
        [3 / 6, (3 + 0.5) / 4],          # level 0: between cells (3, 2) and (3, 3)
    ], [
        [(0 + 0.5) / 3, (1 + 0.5) / 2],  # level 1: the centre of cell (1, 0)
        [0.5, 0.5],                      # weight 0: nothing
    ]]]])
    level0, level1 = splat_deformable_attention(weights, locations, shapes)
    expected0 = torch.zeros(4, 6)
    expected0[1, 2] = 0.5
    expected0[3, 2] = expected0[3, 3] = 0.1
    expected1 = torch.zeros(2, 3)
    expected1[1, 0] = 0.3
    assert torch.allclose(level0[0], expected0, atol=1e-6)
    assert torch.allclose(level1[0], expected1, atol=1e-6)


def test_splat_equals_what_grid_sample_reads_for_any_locations_and_loses_what_falls_outside():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    weights = torch.rand(6, 4, 3, 4, generator=g).softmax(-1)
    locations = torch.rand(6, 4, 3, 4, 2, generator=g) * 1.4 - 0.2  # some points outside the grid
    maps = splat_deformable_attention(weights, locations, shapes, heads="none")
    ours = torch.cat([m.flatten(2) for m in maps], -1)
    assert torch.allclose(ours, reference_splat(weights, locations, shapes), atol=1e-6)
    assert (ours.sum(-1) <= weights.sum((-1, -2)) + 1e-6).all()


@pytest.mark.parametrize("architecture", ["deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "rf_detr"])
def test_deformable_attention_is_read_from_the_models_own_sampling(architecture, monkeypatch):
    """The locations and weights detlens reads are the ones the model's sampler used."""
    model = small(architecture)
    adapter = adapter_for(model)
    seen = []
    if architecture in ("rt_detr_v2", "d_fine"):  # their sampler is a module-level function: wrap it
        import importlib

        module = importlib.import_module(type(model).__module__)
        name = "multi_scale_deformable_attention_v2"
        original = getattr(module, name)

        def spy(value, shapes, locations, weights, *args, **kwargs):
            seen.append((locations.detach().clone(), weights.detach().clone()))
            return original(value, shapes, locations, weights, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
        for m in model.modules():  # D-FINE keeps the function on the module
            if hasattr(m, "ms_deformable_attn_core"):
                monkeypatch.setattr(m, "ms_deformable_attn_core", spy)
    else:
        cross = "cross_attn" if architecture == "rf_detr" else "encoder_attn"
        sampler = dict(model.named_modules())[f"model.decoder.layers.1.{cross}.attn"]
        sampler.register_forward_pre_hook(lambda m, a: seen.append((a[4].detach().clone(), a[5].detach().clone())))
    read = adapter.query_attention(images(architecture)[1:], top_k=3, layers=[-1])
    att = read.decoder[1]
    own_locations, own_weights = seen[-1]
    assert torch.allclose(att.locations, own_locations.reshape(att.locations.shape).float(), atol=1e-6)
    assert torch.allclose(att.weights, own_weights.reshape(att.weights.shape).float(), atol=1e-7)
    maps = detection_attention_maps(read, [(40, 32)])
    if architecture in ("rt_detr", "rt_detr_v2", "d_fine"):  # AIFI: dense self-attention over the stride-32 level
        aifi = adapter.query_attention(images(architecture)[1:], top_k=3, encoder=True)
        assert set(aifi.encoder) == {0} and aifi.encoder[0].grid == (3, 2)  # 80 x 64 padded to 96 x 64
        assert torch.allclose(aifi.encoder[0].weights.sum(-1), torch.ones(()), atol=1e-5)
    levels = {f"decoder/layer1/level{n}" for n in range(len(att.shapes))}
    assert {"decoder/layer1"} | levels == {k for k in maps[0] if k.startswith("decoder/layer1")}
    fused = maps[0]["decoder/layer1"]
    assert fused.shape == (3, 40, 32) and torch.isfinite(fused).all()
    assert fused.amax((1, 2)).eq(1).all()  # display scale: each map spans [0, 1]


@pytest.mark.parametrize("architecture", DENSE)
def test_dense_cross_attention_per_detection_respects_padding(architecture):
    model = small(architecture, attn_implementation="sdpa")  # detlens switches to eager for its forward only
    adapter = adapter_for(model)
    batch = images(architecture)
    read = adapter.query_attention(batch, top_k=2, layers=[0, -1], encoder=True)
    assert model.config._attn_implementation == "sdpa"
    assert set(read.decoder) == ({0, 1} if architecture != "yolos" else {0, 1})
    for att in read.decoder.values():
        assert torch.allclose(att.weights.sum(-1), torch.ones(()), atol=1e-5) or architecture == "yolos"
        if att.key_padding is not None:  # padded cells of the smaller image get no attention
            pad = att.key_padding[None, :, None, :].expand(att.weights.shape[1], -1, att.weights.shape[2], -1)
            assert att.weights.transpose(0, 1)[pad].abs().max() < 1e-6
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in batch]
    maps = detection_attention_maps(read, sizes, reference_points=[torch.tensor([[10.0, 10.0]])] * 2,
                                    encoder_layer=0 if architecture != "yolos" else None, rollout=architecture != "yolos")
    for b, m in enumerate(maps):
        assert m["decoder/layer1"].shape == (2, *sizes[b])
        if architecture != "yolos":
            assert {"encoder/layer0", "rollout"} <= set(m)


# ---------------------------------------------------------------------------- entropy from the training forward
def test_entropy_is_read_from_the_training_forward_of_dense_and_deformable_attention():
    for architecture in ("detr", "deformable_detr"):
        model = small(architecture).train()
        monitor = EntropyMonitor(model)
        assert any("encoder_attn" in n for n in monitor.names)
        with monitor.armed_for():
            model(pixel_values=torch.rand(2, 3, 64, 64))
        entropy = monitor.collect()
        assert set(entropy) == set(monitor.names)
        for name, per_head in entropy.items():
            assert per_head.shape == (4,) if "encoder_attn" in name or "self_attn" in name else True
            assert ((per_head >= 0) & (per_head <= 1 + 1e-5)).all(), name


def test_a_model_without_eager_attention_is_named_with_the_fix():
    model = small("detr", attn_implementation="sdpa")
    readable, unavailable = find_attention_modules(model)
    assert readable == {} and unavailable
    assert all("attn_implementation='eager'" in why for why in unavailable.values())
    with pytest.raises(AttentionUnavailable, match="eager"):
        find_attention_modules(model, ["model.decoder.layers.0.encoder_attn"])


# ---------------------------------------------------------------------------- users' LightningModules
class UserModule(pl.LightningModule):
    def __init__(self, *networks: torch.nn.Module) -> None:
        super().__init__()
        self.detector = networks[0]
        if len(networks) > 1:
            self.teacher = networks[1]


def test_a_lightning_module_holding_the_network_as_detector_needs_no_adapter():
    module = UserModule(small("deformable_detr"))
    path, network, _ = find_network(module)
    assert path == "detector" and network is module.detector
    assert isinstance(adapter_for(module), HFDetrAdapter)


def test_two_detectors_in_one_module_fail_naming_both_and_the_choice():
    module = UserModule(small("detr"), small("rt_detr"))
    with pytest.raises(ValueError, match=r"detector .*DetrForObjectDetection.*teacher .*RTDetrForObjectDetection.*model_attr"):
        adapter_for(module)
    assert adapter_for(module, model_attr="teacher").model is module.teacher


def test_from_pretrained_loads_a_local_folder_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = HFDetector(architecture="deformable_detr", num_classes=3, config=dict(d_model=32, num_queries=10))
    source.model.save_pretrained(tmp_path / "ckpt")
    loaded = HFDetector(num_classes=3, pretrained_path=str(tmp_path / "ckpt"))
    assert type(loaded.model) is type(source.model)
    for (name, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="not a folder"):
        HFDetector(num_classes=3, pretrained_path=str(tmp_path / "missing"))


def test_hf_detector_trains_on_detlens_batches_and_returns_detections_in_image_pixels():
    torch.manual_seed(0)
    module = HFDetector(architecture="detr", num_classes=3, config=dict(d_model=32, num_queries=10), score_thresh=0.0)
    batch = ([torch.rand(3, 64, 96), torch.rand(3, 80, 64)],
             [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    module.train()
    pixel_values, pixel_mask = hf_inputs(batch[0])
    assert pixel_values.shape == (2, 3, 80, 96) and pixel_mask[1, :, 64:].eq(0).all() and pixel_mask[1, :, :64].eq(1).all()
    labels = hf_labels(batch[1], (80, 96))
    assert torch.allclose(labels[0]["boxes"], torch.tensor([[22 / 96, 18 / 80, 36 / 96, 24 / 80]]))
    assert labels[0]["class_labels"].tolist() == [2]
    loss = module.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and module.model.class_labels_classifier.weight.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        detections = module(batch[0])
    assert len(detections) == 2 and len(detections[0]["boxes"]) == 10
    assert (detections[1]["boxes"][:, 2] <= 64).all() and (detections[1]["boxes"][:, 3] <= 80).all()
    assert ((detections[0]["labels"] >= 0) & (detections[0]["labels"] <= 4)).all()
