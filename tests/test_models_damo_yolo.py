"""DAMO-YOLO from modelscope's own code: detections as ZeroHead's own eval gives them, exact fast
paths, well-formed maps, training untouched by every callback, and a 2-process DDP fit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

pytest.importorskip("modelscope", reason="DAMO-YOLO needs the detlens[damo] extra (make install has it)")

import detlens  # noqa: E402
from detlens.adapters import DamoYoloAdapter, adapter_for  # noqa: E402
from detlens.explainers.gradcam import gradcam  # noqa: E402
from detlens.lightning_modules import DamoYolo  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread")]


def lift_scores(module: DamoYolo, bias: float = -2.0) -> DamoYolo:
    """DAMO-YOLO's initial class bias scores 0.01 everywhere, below its 0.05 candidate threshold;
    a bias of -2 spreads the scores around 0.12 so an untrained model has detections."""
    for conv in module.model.head.gfl_cls:
        conv.bias.data.fill_(bias)
    return module


@pytest.fixture(scope="module")
def damo():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return lift_scores(DamoYolo(num_classes=3)).eval()


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=g), torch.rand(3, 64, 96, generator=g)]


def test_detections_equal_zerohead_own_eval_and_postprocess(damo):
    adapter = adapter_for(damo)
    assert isinstance(adapter, DamoYoloAdapter)
    ims = images()
    out = adapter.run(ims, with_grad=False)
    with torch.no_grad():
        theirs = damo.model(torch.stack(ims) * 255)  # 64 x 96: a multiple of 32, no padding
    for det, ref in zip(out.detections, theirs):
        scores = ref.get_field("scores")
        assert len(det) == len(scores) > 5
        order = torch.argsort(scores, descending=True, stable=True)
        boxes = ref.bbox[order].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, 96)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 64)
        torch.testing.assert_close(det.scores, scores[order], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(det.boxes, boxes, rtol=1e-5, atol=1e-3)
        assert torch.equal(det.labels, ref.get_field("labels")[order].long())


def negated(out):
    return replace(out, detections=[replace(d, score_graph=-d.score_graph, box_graph=-d.box_graph) for d in out.detections])


@pytest.mark.parametrize("layer", ["neck", "neck_fused", "backbone.block_list.3"])
@pytest.mark.parametrize("weighting", ["gradcam", "elementwise", "layercam"])
def test_fast_path_equals_the_per_detection_loop(damo, layer, weighting):
    out = adapter_for(damo).run(images(), [layer], top_k=4)
    assert [len(d) for d in out.detections] == [4, 4]
    for target in ("class", "both"):
        seen = []
        for explained in (out, negated(out)):
            fast = gradcam(explained, layer, target=target, weighting=weighting, fast=True)
            slow = gradcam(explained, layer, target=target, weighting=weighting, fast=False)
            for f, s in zip(fast, slow):
                peak = s.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
                assert float(((f - s).abs() / peak).max()) <= 1e-5
            seen.append(torch.cat([m.flatten(1).amax(1) for m in slow]))
        assert bool(((seen[0] + seen[1]) > 0).all())  # every detection's score depends on the layer


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam", "input_gradient", "feature_grid", "drise"])
def test_maps_are_finite_for_gray_non_square_images_and_for_no_detection(damo, method):
    layer = "neck/P3" if method == "feature_grid" else None
    out = detlens.explain(damo, [torch.rand(1, 50, 70), torch.rand(3, 40, 100)], method=method, layer=layer,
                          top_k=3, num_masks=8)
    for e, size in zip(out, [(50, 70), (40, 100)]):
        assert e.maps.shape[-2:] == size and torch.isfinite(e.raw).all() and bool((e.raw >= 0).all())
        if method != "feature_grid":
            assert len(e) == 3 and float(e.raw.amax()) > 0
    (none,) = detlens.explain(damo, [torch.rand(3, 40, 100)], method=method, layer=layer, score_threshold=0.9999,
                              num_masks=4)
    assert len(none) == 0 and torch.isfinite(none.raw).all()
    assert all(p.grad is None for p in damo.parameters())


@pytest.mark.numerics
@pytest.mark.slow
def test_training_with_every_callback_is_bit_identical_to_training_without(scenes_root):
    """ZeroHead's losses train the model (finite losses, weights move), and detlens' callbacks at
    every step change nothing: weights, optimiser, scheduler and RNG streams bit-identical."""
    import pytorch_lightning as pl
    from reliability_utils import differing_leaves, every_callback, quiet_trainer, rng_state, same_rng_state, scenes

    from detlens.callbacks.attention_entropy import AttentionEntropyCallback
    from detlens.callbacks.attention_maps import AttentionMapCallback

    def fit(callbacks):
        pl.seed_everything(0)
        torch.use_deterministic_algorithms(True)
        try:
            dm = scenes(scenes_root, batch_size=4)
            module = DamoYolo(num_classes=dm.num_classes, class_names=dm.class_names, warmup_steps=1, score_thresh=0.0)
            initial = {k: v.clone() for k, v in module.state_dict().items()}
            losses = []

            class Losses(pl.Callback):
                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    losses.append(float(outputs["loss"]))

            trainer = quiet_trainer(max_epochs=2, deterministic=True, callbacks=[*callbacks, Losses()], limit_val_batches=1)
            trainer.fit(module, dm)
        finally:
            torch.use_deterministic_algorithms(False)
        return {"weights": module.state_dict(), "initial": initial, "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "rng": rng_state(), "losses": losses}

    callbacks = [c for c in every_callback(every_n_steps=1)
                 if not isinstance(c, (AttentionMapCallback, AttentionEntropyCallback))]  # DAMO-YOLO has no attention
    with_cb = fit(callbacks)
    without = fit([])
    assert [c.num_logging_events for c in callbacks] == [4] * len(callbacks)
    assert with_cb["losses"] == without["losses"] and len(with_cb["losses"]) == 4
    assert all(torch.isfinite(torch.tensor(with_cb["losses"])))
    key = "model.head.gfl_cls.0.weight"
    assert not torch.equal(with_cb["weights"][key], with_cb["initial"][key])
    assert [k for k in without["weights"] if not torch.equal(with_cb["weights"][k], without["weights"][k])] == []
    assert not differing_leaves(with_cb["optimizer"], without["optimizer"])
    assert not differing_leaves(with_cb["scheduler"], without["scheduler"])
    assert not same_rng_state(with_cb["rng"], without["rng"])


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from detlens.callbacks import GradCAMCallback, PredictionOverlayCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import DamoYolo

    if __name__ == "__main__":
        root, save_dir = sys.argv[1], sys.argv[2]
        dm = SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=64, batch_size=2, horizontal_flip=False)
        model = DamoYolo(num_classes=dm.num_classes, class_names=dm.class_names, score_thresh=0.0, warmup_steps=1)
        callbacks = [
            PredictionOverlayCallback(score_threshold=0.0, max_detections=5, num_probe_images=3),
            GradCAMCallback(method="layercam", layer="neck", score_threshold=0.0, top_k=2, num_probe_images=3),
        ]
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=WandbLogger(offline=True, save_dir=save_dir),
            callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, log_every_n_steps=1,
        )
        trainer.fit(model, dm)
        if trainer.is_global_zero:
            import wandb
            wandb.finish()
    """
)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_cpu_ddp_fit_makes_one_run_with_every_probe_image(tmp_path):
    from wandb_utils import finished_run, image_events

    from detlens.data import SyntheticDataModule
    from wandb_offline import find_offline_runs

    root = tmp_path / "scenes"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=64, batch_size=2)
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "logs")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = find_offline_runs(tmp_path / "logs")
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])
    for key in ("predictions/probe", "gradcam/probe"):
        events = image_events(run, key)
        assert [e.global_step for e in events] == [2]
        # the 3 probe images of the 4 validation images, as the other DDP tests pick them, over both ranks
        assert [c.split(" (")[0] for c in events[0].captions] == ["img 0", "img 2", "img 3"]
    assert len(run.history_of("val/mAP")) == 1
