"""detlens on Ultralytics YOLOv8: detections as Ultralytics post-processes them, exact fast paths,
well-formed maps, discovery through the entry point only, untouched training, and a checkpoint
written by Ultralytics' own trainer explained by ``detlens.explain``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import detlens
from detlens.adapters import adapter_for
from detlens.explainers.gradcam import gradcam
from detlens_ultralytics import UltralyticsAdapter, UltralyticsDetector, load_ultralytics_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[3]


def yolo(num_classes: int = 3, seed: int = 0, cls_bias: float | None = -2.0) -> UltralyticsDetector:
    """YOLOv8n with random weights; ``cls_bias`` lifts the class logits' bias (Ultralytics'
    initial bias scores ~1e-4 everywhere) so an untrained model has candidates to keep."""
    torch.manual_seed(seed)
    module = UltralyticsDetector(num_classes=num_classes, model_yaml="yolov8n.yaml")
    if cls_bias is not None:
        for branch in module.model.model[-1].cv3:
            branch[-1].bias.data.fill_(cls_bias)
    return module.eval()


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=g), torch.rand(3, 64, 96, generator=g)]


def test_detections_equal_ultralytics_own_inference_and_nms():
    """Boxes, scores and classes as the model's own eval forward + Ultralytics' NMS give them."""
    from ultralytics.utils.nms import non_max_suppression

    module = yolo()
    ims = images()
    adapter = adapter_for(module)
    assert isinstance(adapter, UltralyticsAdapter)
    out = adapter.run(ims, with_grad=False)
    with torch.no_grad():
        pred, _ = module.model(torch.stack(ims))  # 64 x 96: a multiple of the stride, no padding
    theirs = non_max_suppression(pred, conf_thres=adapter.candidate_threshold, iou_thres=adapter.nms_iou, max_det=adapter.max_det)
    for det, ref in zip(out.detections, theirs):
        assert len(det) == len(ref) > 5
        ref_boxes = ref[:, :4].clone()
        ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(0, 96)
        ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(0, 64)
        order = torch.argsort(ref[:, 4], descending=True, stable=True)
        torch.testing.assert_close(det.scores, ref[order, 4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(det.boxes, ref_boxes[order], rtol=1e-5, atol=1e-3)
        assert torch.equal(det.labels, ref[order, 5].long() + 1)  # detlens labels 1..C


def negated(out):
    return replace(out, detections=[replace(d, score_graph=-d.score_graph, box_graph=-d.box_graph) for d in out.detections])


def assert_same_maps(fast, slow, tol=1e-5):
    for f, s in zip(fast, slow):
        assert f.shape == s.shape
        peak = s.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
        assert float(((f - s).abs() / peak).max()) <= tol


@pytest.mark.parametrize("layer", ["neck", "neck_fused", "model.2", "model.15"])
@pytest.mark.parametrize("weighting", ["gradcam", "elementwise", "layercam"])
def test_fast_path_equals_the_per_detection_loop(layer, weighting):
    module = yolo()
    out = adapter_for(module).run(images(), [layer], top_k=6)
    assert [len(d) for d in out.detections] == [6, 6]
    for target in ("class", "both"):
        seen = []
        for explained in (out, negated(out)):
            fast = gradcam(explained, layer, target=target, weighting=weighting, fast=True)
            slow = gradcam(explained, layer, target=target, weighting=weighting, fast=False)
            assert_same_maps(fast, slow)
            seen.append(torch.cat([m.flatten(1).amax(1) for m in slow]))
        # every detection's score depends on the layer: one sign or the other shows it
        assert bool(((seen[0] + seen[1]) > 0).all())


def test_neck_explains_each_detection_on_its_own_level_and_fused_takes_the_maximum():
    module = yolo()
    ad = adapter_for(module)
    out = ad.run(images()[:1], ["neck", "neck_fused"], top_k=8)
    levels = out.detections[0].level
    assert set(levels) <= {"P3", "P4", "P5"}
    per_level = {name: gradcam(out, f"neck/{name}")[0] for name in ("P3", "P4", "P5")}
    own = gradcam(out, "neck")[0]
    for d, name in enumerate(levels):
        torch.testing.assert_close(own[d], per_level[name][d])
    fused = gradcam(out, "neck_fused")[0]
    torch.testing.assert_close(fused, torch.stack(list(per_level.values())).amax(0))
    # box features: the head's input at the anchor cell of the detection's level
    feats = out.detections[0].features
    stride = {"P3": 8, "P4": 16, "P5": 32}
    for d, name in enumerate(levels):
        x1, y1, x2, y2 = out.detections[0].boxes[d].tolist()
        act = out.activations[f"neck/{name}"][0].detach()
        w = act.shape[-1]
        local = int(out.detections[0].origin[d]) - sum(
            out.activations[f"neck/{n}"].shape[-2] * out.activations[f"neck/{n}"].shape[-1]
            for n in ("P3", "P4", "P5")[: ("P3", "P4", "P5").index(name)])
        torch.testing.assert_close(feats[d, : act.shape[0]], act[:, local // w, local % w])
        assert stride[name] * (local % w) <= x2 and x1 <= stride[name] * (local % w + 1)  # anchor cell meets its box


METHODS = ["gradcam", "elementwise", "layercam", "eigencam", "input_gradient", "feature_grid", "drise"]


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_finite_for_gray_non_square_images_and_for_no_detection(method):
    module = yolo()
    gray = torch.rand(1, 50, 70)
    wide = torch.rand(3, 40, 100)
    layer = "model.6" if method == "feature_grid" else None
    out = detlens.explain(module, [gray, wide], method=method, layer=layer, target="both" if method != "eigencam" else "class",
                          top_k=3, num_masks=8)
    for e, size in zip(out, [(50, 70), (40, 100)]):
        assert e.maps.shape[-2:] == size and torch.isfinite(e.raw).all() and bool((e.raw >= 0).all())
        if method != "feature_grid":
            assert len(e) == 3 and float(e.raw.amax()) > 0
    (none,) = detlens.explain(module, [wide], method=method, layer=layer, score_threshold=0.9999, num_masks=4)
    assert len(none) == 0 and torch.isfinite(none.raw).all()
    if method != "feature_grid":
        assert none.raw.shape == (0, 40, 100)
    assert all(p.grad is None for p in module.parameters())


def test_detlens_finds_the_plugin_through_its_entry_point_and_never_imports_ultralytics():
    script = textwrap.dedent(
        """
        import sys, torch
        import detlens, detlens.adapters, detlens.callbacks, detlens.explainers, detlens.lightning_modules, detlens.cli
        assert "ultralytics" not in sys.modules, "importing detlens imported ultralytics"
        names = [f.name for f in detlens.adapters.registry.registry.families]  # loads the entry points
        assert any("Ultralytics" in n for n in names), names
        # importing Ultralytics patches PIL.Image.open process-wide: the entry point must not
        assert "ultralytics" not in sys.modules, "loading the plugin's entry point imported ultralytics"
        from ultralytics.nn.tasks import DetectionModel
        net = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
        holder = torch.nn.Module(); holder.detector = torch.nn.Sequential(net)
        adapter = detlens.adapters.adapter_for(holder)  # no register() call: the entry point did it
        print(type(adapter).__module__, type(adapter).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "YOLO_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["detlens_ultralytics.adapter", "UltralyticsAdapter"]
    sources = [p for p in (REPO / "src" / "detlens").rglob("*.py") if "ultralytics" in p.read_text()]
    imports = [p for p in sources if any(line.lstrip().startswith(("import ultralytics", "from ultralytics"))
                                         for line in p.read_text().splitlines())]
    assert imports == []


@pytest.mark.numerics
@pytest.mark.slow
def test_training_with_callbacks_is_bit_identical_to_training_without(scenes_root):
    """Lightning + v8DetectionLoss trains (finite losses, weights move) and detlens' callbacks at
    every step change nothing of it: weights, optimiser, scheduler and RNG streams bit-identical."""
    import pytorch_lightning as pl
    from reliability_utils import differing_leaves, every_callback, quiet_trainer, rng_state, same_rng_state, scenes

    from detlens.callbacks.attention_entropy import AttentionEntropyCallback
    from detlens.callbacks.attention_maps import AttentionMapCallback

    def fit(callbacks):
        pl.seed_everything(0)
        torch.use_deterministic_algorithms(True)
        try:
            dm = scenes(scenes_root, batch_size=4)
            module = UltralyticsDetector(num_classes=dm.num_classes, class_names=dm.class_names, warmup_steps=1, lr=2e-3)
            initial = {k: v.clone() for k, v in module.state_dict().items()}
            losses = []

            class Losses(pl.Callback):
                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    losses.append(float(outputs["loss"]))

            trainer = quiet_trainer(max_epochs=3, deterministic=True, callbacks=[*callbacks, Losses()], limit_val_batches=1)
            trainer.fit(module, dm)
        finally:
            torch.use_deterministic_algorithms(False)
        return {"weights": module.state_dict(), "initial": initial, "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "rng": rng_state(), "losses": losses}

    callbacks = [c for c in every_callback(every_n_steps=1)
                 if not isinstance(c, (AttentionMapCallback, AttentionEntropyCallback))]  # YOLOv8 has no attention
    with_cb = fit(callbacks)
    without = fit([])
    assert [c.num_logging_events for c in callbacks] == [6] * len(callbacks)
    assert with_cb["losses"] == without["losses"] and len(with_cb["losses"]) == 6
    assert all(torch.isfinite(torch.tensor(with_cb["losses"])))
    assert not torch.equal(with_cb["weights"]["model.model.22.cv3.0.2.weight"], with_cb["initial"]["model.model.22.cv3.0.2.weight"])
    assert [k for k in without["weights"] if not torch.equal(with_cb["weights"][k], without["weights"][k])] == []
    assert not differing_leaves(with_cb["optimizer"], without["optimizer"])
    assert not differing_leaves(with_cb["scheduler"], without["scheduler"])
    assert not same_rng_state(with_cb["rng"], without["rng"])


@pytest.mark.slow
def test_a_checkpoint_written_by_ultralytics_trainer_is_explained(tmp_path):
    """Ultralytics' own trainer (1 epoch, a tiny YOLO-format dataset written here) writes
    ``last.pt``; detlens loads its model and explains it, labels being its class indices."""
    from PIL import Image

    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            img = torch.full((64, 64, 3), 40, dtype=torch.uint8)
            x0, y0 = int(torch.randint(4, 30, (1,), generator=g)), int(torch.randint(4, 30, (1,), generator=g))
            img[y0 : y0 + 24, x0 : x0 + 24] = torch.tensor([220, 60, 60], dtype=torch.uint8)
            Image.fromarray(img.numpy()).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(f"1 {(x0 + 12) / 64} {(y0 + 12) / 64} {24 / 64} {24 / 64}\n")
    (tmp_path / "data.yaml").write_text(json.dumps({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "names": {0: "blue", 1: "red"}}))
    script = textwrap.dedent(
        f"""
        from ultralytics import YOLO
        YOLO("yolov8n.yaml").train(data={str(tmp_path / 'data.yaml')!r}, epochs=1, imgsz=64, batch=4, device="cpu",
                                  workers=0, plots=False, val=False, amp=False, project={str(tmp_path / 'runs')!r},
                                  name="train", exist_ok=True, verbose=False)
        """
    )
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "runs" / "train" / "weights" / "last.pt"
    assert ckpt.exists(), sorted(str(p) for p in (tmp_path / "runs").rglob("*"))

    net = load_ultralytics_checkpoint(ckpt)
    assert net.names == {0: "blue", 1: "red"} and int(net.model[-1].nc) == 2
    image = torch.tensor(__import__("numpy").array(Image.open(root / "images" / "val" / "0.png"))).permute(2, 0, 1) / 255
    assert isinstance(adapter_for(net), UltralyticsAdapter)  # found through the registry
    adapter = UltralyticsAdapter(net)
    adapter.candidate_threshold = 0.0  # after one epoch the scores are tiny: explain the five best anyway
    (ex,) = detlens.explain(net, [image], method="gradcam", layer="neck", top_k=5, adapter=adapter)
    assert len(ex) == 5 and set(ex.labels.tolist()) <= {0, 1}
    assert torch.isfinite(ex.raw).all() and float(ex.raw.amax()) > 0
    (lc,) = detlens.explain(net, [image], method="layercam", layer="neck_fused", top_k=5, adapter=adapter)
    assert torch.equal(lc.boxes, ex.boxes) and float(lc.raw.amax()) > 0
