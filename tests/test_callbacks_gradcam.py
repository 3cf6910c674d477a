"""GradCAMCallback in real fits: overlays with boxes and focus metrics land in W&B, validate() works, training is untouched."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import image_events, newest_offline_run, scalar_history

from detlens.callbacks.gradcam import GradCAMCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # tests/conftest.py


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return str(root)


def scenes(root: str) -> SyntheticDataModule:
    return SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def detector(dm: SyntheticDataModule) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE,
        max_size=SIZE, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
        box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
        attention_stage="layer3",
    )


def trainer(**overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def test_fit_logs_cam_overlays_with_boxes_and_focus_metrics(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callback = GradCAMCallback(top_k=3, score_threshold=0.0, num_probe_images=2, iou_threshold=0.1)
    pl.seed_everything(0)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback]).fit(detector(dm), dm)
    wandb.finish()

    run = newest_offline_run(tmp_path)
    events = image_events(run, "gradcam/probe")
    assert [e.global_step for e in events] == [2, 4] and callback.num_logging_events == 2
    for event in events:
        assert len(event.captions) == 2 and all(c.endswith(f"· step {event.global_step}") for c in event.captions)
        predictions = event.boxes(run, "predictions")
        truths = event.boxes(run, "ground_truth")
        assert [len(p["box_data"]) for p in predictions] == [3, 3]
        assert all(t["box_data"] for t in truths)
        assert set(predictions[0]["class_labels"].values()) >= set(dm.class_names.values())
        files = event.image_files(run)
        pixels = np.asarray(Image.open(files[0]).convert("RGB"))
        assert pixels.shape == (SIZE, SIZE, 3)
    history = {k: scalar_history(run, f"gradcam/{k}") for k in ("detections_per_image", "peak")}
    assert history["detections_per_image"] == [3.0, 3.0]
    assert len(history["peak"]) == 2 and history["peak"][0] == pytest.approx(1.0), "1.0 = the first point's scale"
    # Focus metrics are logged for true positives (IoU >= 0.1 here), next to their chance level.
    energy = scalar_history(run, "gradcam/energy_in_box")
    chance = scalar_history(run, "gradcam/energy_in_box_chance")
    assert len(energy) == len(chance) == len(scalar_history(run, "gradcam/pointing_game")) >= 1
    assert all(0.0 <= v <= 1.0 for v in energy + chance)
    assert callback.state_dict()["scale"]["reference"][callback.scale_key] > 0


def test_validate_under_inference_mode_explains_once(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callback = GradCAMCallback(method="elementwise", target="both", top_k=2, score_threshold=0.0, num_probe_images=2)
    fit = trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback])
    assert fit.validate(detector(dm), dm, verbose=False) is not None
    wandb.finish()
    (event,) = image_events(newest_offline_run(tmp_path), "gradcam/probe")
    assert event.captions[0].endswith("step 0") and callback.num_logging_events == 1


def fit_weights(dm: SyntheticDataModule, callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = detector(dm)
    trainer(max_epochs=1, deterministic=True, callbacks=callbacks, limit_val_batches=0).fit(model, dm)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_fit_with_the_callback_ends_with_bit_identical_weights(scenes_root):
    dm = scenes(scenes_root)
    callback = GradCAMCallback(top_k=3, score_threshold=0.0, every_n_steps=1, num_probe_images=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_callback = fit_weights(dm, [callback])
    assert not [str(w.message) for w in caught if "[detlens]" in str(w.message)], "the callback must not fail"
    without = fit_weights(scenes(scenes_root), [])
    assert callback.num_logging_events >= 2
    differing = [k for k in without if not torch.equal(with_callback[k], without[k])]
    assert not differing, f"weights/buffers differ: {differing[:5]}"


def test_misconfigurations_are_explained_before_training(scenes_root):
    with pytest.raises(ValueError, match="method must be one of"):
        GradCAMCallback(method="gradcam++")
    with pytest.raises(ValueError, match="target must be one of"):
        GradCAMCallback(target="mask")
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        GradCAMCallback(top_k=0)
    with pytest.raises(ValueError, match="unknown matplotlib colormap"):
        GradCAMCallback(colormap="rainbowz")
    dm = scenes(scenes_root)
    with pytest.raises(ValueError, match=r"Unknown target layer 'backbone\.body\.layer5'.*Closest: 'backbone\.body\.layer"):
        trainer(callbacks=[GradCAMCallback(layer="backbone.body.layer5")]).fit(detector(dm), dm)


def test_the_fixed_scale_survives_a_checkpoint(scenes_root, tmp_path):
    dm = scenes(scenes_root)
    first = GradCAMCallback(top_k=2, score_threshold=0.0, num_probe_images=1)
    fit = trainer(max_epochs=1, callbacks=[first], limit_val_batches=1)
    fit.fit(detector(dm), dm)
    fit.save_checkpoint(tmp_path / "epoch1.ckpt")
    reference = first.scale.reference(first.scale_key)
    assert reference is not None and reference > 0

    resumed = GradCAMCallback(top_k=2, score_threshold=0.0, num_probe_images=1)
    trainer(max_epochs=2, callbacks=[resumed], limit_val_batches=1).fit(detector(dm), dm, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.num_logging_events == 2
    assert resumed.scale.reference(resumed.scale_key) == reference


def test_an_event_with_nothing_above_the_threshold_says_so_and_shows_best_guesses(scenes_root, tmp_path, caplog, finish_wandb):
    """An early model at score_threshold 0.5 used to give tinted overlays, no metric and no word."""
    from detlens.focus.record import read_focus_record

    dm = scenes(scenes_root)
    guesses = GradCAMCallback(top_k=3, score_threshold=1.0, num_probe_images=2)  # no score exceeds 1.0
    nothing = GradCAMCallback(top_k=3, score_threshold=1.0, num_probe_images=2, min_detections=0, log_key="strict")
    pl.seed_everything(0)
    with caplog.at_level("INFO"):
        trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[guesses, nothing], max_epochs=1,
                num_sanity_val_steps=0).fit(detector(dm), dm)
    wandb.finish()

    said = [r.getMessage() for r in caplog.records if "no detection scored above score_threshold 1" in r.getMessage()]
    assert len(said) == 2 and "highest score" in said[0] and "gradcam/detections_per_image is 0" in said[0]
    run = newest_offline_run(tmp_path)
    (event,) = image_events(run, "gradcam/probe")
    assert all("· 1 below threshold 1 (best guesses" in c for c in event.captions)
    assert [len(p["box_data"]) for p in event.boxes(run, "predictions")] == [1, 1]
    assert scalar_history(run, "gradcam/detections_per_image") == [0.0]
    assert scalar_history(run, "gradcam/below_threshold_per_image") == [1.0]
    assert not scalar_history(run, "gradcam/energy_in_box") and not scalar_history(run, "gradcam/true_positive_rate")
    (point,) = read_focus_record(run.run_dir).map_points("gradcam")
    assert all(im.below_threshold.tolist() == [True] and not im.is_tp.any() for im in point.images)

    (strict,) = image_events(run, "strict/probe")
    assert all(c.endswith("· no detection explained (none above 1)") for c in strict.captions)
    for index, file in zip(nothing.probe_indices, strict.image_files(run)):
        shown = np.asarray(Image.open(file).convert("RGB")).astype(float)
        image = dm.val_dataset[index][0].permute(1, 2, 0).numpy() * 255
        # untinted: JPEG noise averages out per channel, a colour map's tint would not (jet's 0 is dark blue)
        assert np.abs((shown - image).mean(axis=(0, 1))).max() < 2, "no map: the image is shown untinted"


def test_validating_a_checkpoint_captions_the_model_s_own_step(scenes_root, tmp_path, finish_wandb):
    from pytorch_lightning.callbacks import ModelCheckpoint

    dm = scenes(scenes_root)
    pl.seed_everything(0)
    model = detector(dm)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoints], num_sanity_val_steps=0).fit(model, dm)
    callback = GradCAMCallback(top_k=2, score_threshold=0.0, num_probe_images=2)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback]).validate(
        detector(dm), dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    wandb.finish()

    (event,) = image_events(run := newest_offline_run(tmp_path), "gradcam/probe")
    assert all(c.endswith("· step 2") for c in event.captions), event.captions
    assert run.run_dir.exists()
