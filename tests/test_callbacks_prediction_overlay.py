"""PredictionOverlayCallback in real fits: what lands in W&B, when it runs, and that training is untouched."""

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

from detlens.callbacks import PredictionOverlayCallback, ProbeCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return str(root)


def scenes(root: str) -> SyntheticDataModule:
    """8 training images (2 steps per epoch at batch 4), 4 validation images."""
    return SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def detector(dm: SyntheticDataModule) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn",
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        min_size=SIZE,
        max_size=SIZE,
        fpn_channels=16,
        representation_size=32,
        rpn_proposals_train=50,
        rpn_proposals_test=20,
        box_batch_size_per_image=16,
        anchor_sizes=[8, 16, 32, 64, 128],
        score_thresh=0.0,
        warmup_steps=1,
    )


def trainer(**overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


@pytest.mark.slow
def test_fit_logs_probe_overlays_with_boxes_and_step_captions_next_to_val_map(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callback = PredictionOverlayCallback(score_threshold=0.0, max_detections=5, num_probe_images=3)
    pl.seed_everything(0)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback]).fit(detector(dm), dm)
    wandb.finish()

    run = newest_offline_run(tmp_path)
    events = image_events(run, "predictions/probe")
    # Once per epoch after validation (global steps 2 and 4), none in the sanity check.
    assert [e.global_step for e in events] == [2, 4] and callback.num_logging_events == 2
    assert callback.probe_indices == [0, 2, 3]
    for event in events:
        assert len(event.captions) == 3
        assert all(c.startswith(f"img {i} (id ") and c.endswith(f"· step {event.global_step}")
                   for i, c in zip([0, 2, 3], event.captions))
        predictions = event.boxes(run, "predictions")
        truths = event.boxes(run, "ground_truth")
        assert all(1 <= len(p["box_data"]) <= 5 for p in predictions)
        assert all(t["box_data"] for t in truths), "every synthetic scene has objects"
        names = set(dm.class_names.values())
        assert all(set(p["class_labels"].values()) >= names for p in predictions)
        box = predictions[0]["box_data"][0]
        assert box["domain"] == "pixel" and 0.0 <= box["scores"]["score"] <= 1.0
        assert all(f.is_file() for f in event.image_files(run))
    assert len(scalar_history(run, "val/mAP")) == 2
    assert len(scalar_history(run, "predictions/mean_score")) == 2


def test_nothing_is_explained_under_fast_dev_run(scenes_root):
    dm = scenes(scenes_root)
    callback = PredictionOverlayCallback(every_n_steps=1)
    trainer(fast_dev_run=True, callbacks=[callback]).fit(detector(dm), dm)
    assert callback.num_logging_events == 0


def fit_weights(dm: SyntheticDataModule, callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = detector(dm)
    trainer(max_epochs=1, deterministic=True, callbacks=callbacks, limit_val_batches=0).fit(model, dm)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_a_fit_with_the_callback_ends_with_bit_identical_weights(scenes_root):
    dm = scenes(scenes_root)
    callback = PredictionOverlayCallback(score_threshold=0.0, every_n_steps=1, num_probe_images=2)
    with_callback = fit_weights(dm, [callback])
    without = fit_weights(scenes(scenes_root), [])

    assert callback.num_logging_events >= 2
    assert with_callback.keys() == without.keys()
    differing = [k for k in without if not torch.equal(with_callback[k], without[k])]
    assert not differing, f"weights/buffers differ: {differing[:5]}"


class FailingOnRank(ProbeCallback):
    def explain_shard(self, pl_module, images, targets, indices):
        raise RuntimeError("explainer exploded")

    def log_results(self, trainer, pl_module, results):
        raise AssertionError("never reached")


def test_an_explainer_error_is_one_warning_per_event_and_training_goes_on(scenes_root):
    dm = scenes(scenes_root)
    fit = trainer(max_epochs=1, callbacks=[FailingOnRank(every_n_epochs=None, every_n_steps=1, num_probe_images=2)])
    with pytest.warns(UserWarning) as record:
        fit.fit(detector(dm), dm)
    messages = [str(w.message) for w in record if "FailingOnRank" in str(w.message)]
    assert len(messages) == 2 and fit.global_step == 2
    assert "rank 0: RuntimeError: explainer exploded" in messages[0] and "step 1" in messages[0]


@pytest.mark.slow
def test_resume_continues_the_counters_and_probe_set_of_each_instance(scenes_root, tmp_path):
    dm = scenes(scenes_root)
    first = PredictionOverlayCallback(num_probe_images=2)
    second = PredictionOverlayCallback(log_key="predictions_fixed", probe_indices=[1], every_n_steps=1)
    assert first.state_key != second.state_key
    fit = trainer(max_epochs=1, callbacks=[first, second], limit_val_batches=1)
    fit.fit(detector(dm), dm)
    fit.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert (first.num_logging_events, second.num_logging_events) == (1, 2)

    resumed_first = PredictionOverlayCallback(num_probe_images=3)  # the run keeps its probe set
    resumed_second = PredictionOverlayCallback(log_key="predictions_fixed", probe_indices=[1], every_n_steps=1)
    trainer(max_epochs=2, callbacks=[resumed_first, resumed_second], limit_val_batches=1).fit(
        detector(dm), dm, ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert (resumed_first.num_logging_events, resumed_second.num_logging_events) == (2, 4)
    assert resumed_first.probe_indices == first.probe_indices == [0, 3]
    assert resumed_second.probe_indices == [1]


def test_validate_on_a_probe_folder_logs_once_at_the_end(scenes_root, tmp_path, finish_wandb):
    folder = tmp_path / "probe"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"shot_{i}.png")
    dm = scenes(scenes_root)
    callback = PredictionOverlayCallback(score_threshold=0.0, probe_dir=str(folder))
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback]).validate(detector(dm), dm)
    wandb.finish()

    (event,) = image_events(newest_offline_run(tmp_path), "predictions/probe")
    assert event.captions == ["img 0 (id 0) · step 0", "img 1 (id 1) · step 0"]
    assert (event.width, event.height) == (50, 40)


def test_misconfigurations_are_explained_before_training(scenes_root):
    with pytest.raises(ValueError, match="every_n_epochs and every_n_steps are both None"):
        PredictionOverlayCallback(every_n_epochs=None)
    with pytest.raises(ValueError, match="probe_indices has duplicates"):
        PredictionOverlayCallback(probe_indices=[1, 1])
    with pytest.raises(ValueError, match="score_threshold must be in"):
        PredictionOverlayCallback(score_threshold=1.5)

    dm = scenes(scenes_root)
    callback = PredictionOverlayCallback(probe_indices=[0, 9])
    with pytest.raises(ValueError, match=r"probe indices \[9\] are past the end of the probe dataset \(4 items"):
        trainer(callbacks=[callback]).fit(detector(dm), dm)

    class NoValidation(pl.LightningDataModule):
        def train_dataloader(self):
            return dm.train_dataloader()

    with pytest.raises(ValueError, match="has no val_dataset .* set probe_dir"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(callbacks=[PredictionOverlayCallback()]).fit(detector(dm), NoValidation())
