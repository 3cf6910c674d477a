"""FocusRegressionCallback in real fits: drift from the previous point and from a baseline read from
a local offline run, W&B summaries, warn/fail actions, and state that survives a resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import newest_offline_run, scalar_history

from detlens.callbacks.focus import FocusRegressionCallback, FocusRegressionError
from detlens.callbacks.gradcam import GradCAMCallback
from detlens.data import SyntheticDataModule
from detlens.focus.record import FocusRecordWriter, read_focus_record
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64


pytestmark = [pytest.mark.usefixtures("one_thread", "finish_wandb"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return root


def scenes(root: Path) -> SyntheticDataModule:
    return SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def detector(dm: SyntheticDataModule) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE,
        max_size=SIZE, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
        box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
    )


def gradcam() -> GradCAMCallback:
    return GradCAMCallback(top_k=3, score_threshold=0.0, num_probe_images=2, iou_threshold=0.1)


def fit(root: Path, save_dir: Path, extra: list[pl.Callback], *, max_epochs: int = 2, ckpt_path: str | None = None,
        checkpoint_dir: Path | None = None) -> pl.Trainer:
    dm = scenes(root)
    pl.seed_everything(0)
    model = detector(dm)
    callbacks: list[pl.Callback] = [gradcam(), *extra]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_epochs=1))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=WandbLogger(offline=True, save_dir=save_dir),
        enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, deterministic=True, callbacks=callbacks,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    wandb.finish()
    return trainer


@pytest.fixture(scope="module")
def baseline_run(scenes_root, tmp_path_factory) -> Path:
    """An offline run of the same fit (GradCAM only): the baseline, read from its local folder.

    On one intra-op thread, as the tests' own fits (the ``one_thread`` fixture): a module
    fixture is set up before function fixtures, and another thread count sums in another
    order, which on some kernels (``ATEN_CPU_CAPABILITY=default``) trains another model."""
    save_dir = tmp_path_factory.mktemp("baseline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(scenes_root, save_dir, [])
    finally:
        torch.set_num_threads(threads)
    return newest_offline_run(save_dir).run_dir


@pytest.fixture(scope="module")
def moved_baseline(baseline_run, tmp_path_factory) -> Path:
    """The baseline's record with every map moved 6 of 32 cells to the right: a baseline the fit drifts from."""
    record = read_focus_record(baseline_run)
    out = tmp_path_factory.mktemp("moved") / "detlens_focus"
    writer = FocusRecordWriter(out)
    for point in record.maps:
        for image in point.images:
            image.maps = np.roll(image.maps, 6, axis=2)
        writer.write(point)
    return out


def test_drift_from_an_identical_baseline_is_zero_and_summarised_in_wandb(scenes_root, baseline_run, tmp_path):
    focus = FocusRegressionCallback(baseline=str(baseline_run), max_drift=0.01, action="fail")
    fit(scenes_root, tmp_path, [focus])  # the same fit as the baseline: no regression, no exception
    run = newest_offline_run(tmp_path)
    assert scalar_history(run, "focus/drift_baseline") == [0.0, 0.0]
    assert scalar_history(run, "focus/similarity_baseline") == pytest.approx([1.0, 1.0])
    assert scalar_history(run, "focus/match_rate_baseline") == [1.0, 1.0]
    assert len(scalar_history(run, "focus/drift_prev")) == 1, "from the second logging point on"
    assert scalar_history(run, "focus/violations") == [0.0, 0.0]
    assert focus.num_points == 2 and focus.num_violations == 0
    # define_metric summaries: the worst value of each run shows in the dashboard's run table.
    assert run.summary["focus/drift_baseline"] == {"max": 0}
    assert set(run.summary["focus/match_rate_baseline"]) == {"min"}
    per_class = [k for k in run.summary if k.startswith("focus/energy_in_box/")]
    assert per_class and all(set(run.summary[k]) == {"min"} for k in per_class)


def test_warn_reports_a_drifted_baseline_and_training_goes_on(scenes_root, moved_baseline, tmp_path):
    focus = FocusRegressionCallback(baseline=str(moved_baseline), max_drift=0.05, action="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(scenes_root, tmp_path, [focus])
    messages = [str(w.message) for w in caught if "focus regression" in str(w.message)]
    assert len(messages) == 2 and "at step 2" in messages[0] and "max_drift 0.05" in messages[0]
    assert trainer.global_step == 4 and focus.num_violations == 2
    run = newest_offline_run(tmp_path)
    drift = scalar_history(run, "focus/drift_baseline")
    assert len(drift) == 2 and all(d > 0.05 for d in drift)
    assert scalar_history(run, "focus/violations") == [1.0, 1.0]


def test_fail_stops_training_at_the_first_regression_with_a_clear_message(scenes_root, moved_baseline, tmp_path):
    focus = FocusRegressionCallback(baseline=str(moved_baseline), max_drift=0.05, action="fail")
    with pytest.raises(FocusRegressionError, match=r"focus regression at step 2: focus drift from the baseline .*Training stopped"):
        fit(scenes_root, tmp_path, [focus])
    assert focus.num_points == 1, "stopped after the first logging point, before the second epoch"


def test_min_energy_in_box_is_checked_per_class(scenes_root, tmp_path):
    # no map is all in its box; one true positive of a class is evidence enough here
    focus = FocusRegressionCallback(max_drift=None, min_energy_in_box=1.0, action="warn", min_class_count=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(scenes_root, tmp_path, [focus])
    messages = [str(w.message) for w in caught if "focus regression" in str(w.message)]
    assert messages and all("energy_in_box/" in m and "< min_energy_in_box 1" in m for m in messages)


def test_resume_keeps_baseline_counters_and_previous_point_for_each_instance(scenes_root, baseline_run, tmp_path):
    first = FocusRegressionCallback(baseline=str(baseline_run), max_drift=None)
    second = FocusRegressionCallback(max_drift=None, log_key="focus_b")
    assert first.state_key != second.state_key
    fit(scenes_root, tmp_path / "w1", [first, second], max_epochs=1, checkpoint_dir=tmp_path / "ckpt")
    assert first.num_points == second.num_points == 1

    resumed = FocusRegressionCallback(max_drift=None)  # baseline restored from the checkpoint
    resumed_b = FocusRegressionCallback(max_drift=None, log_key="focus_b")
    fit(scenes_root, tmp_path / "w2", [resumed, resumed_b], max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.baseline == str(baseline_run) and resumed_b.baseline is None
    assert resumed.num_points == resumed_b.num_points == 2
    run = newest_offline_run(tmp_path / "w2")
    # The resumed run measures drift from the point logged before the checkpoint.
    assert len(scalar_history(run, "focus/drift_prev")) == 1 and len(scalar_history(run, "focus_b/drift_prev")) == 1
    # The restored baseline is compared with (a resumed fit reshuffles its data, so the value is not 0).
    assert len(scalar_history(run, "focus/drift_baseline")) == 1 and not scalar_history(run, "focus_b/drift_baseline")


def test_bad_arguments_and_missing_inputs_are_reported(scenes_root, tmp_path):
    with pytest.raises(ValueError, match="action must be"):
        FocusRegressionCallback(action="stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_drift must be"):
        FocusRegressionCallback(max_drift=-0.1)
    dm = scenes(scenes_root)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FocusRegressionCallback()])
    with pytest.raises(ValueError, match="no callback with log_key 'gradcam'"):
        trainer.validate(detector(dm), dm, verbose=False)
    artifact = FocusRegressionCallback(baseline="me/detlens/detlens-focus-abc:latest")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[gradcam(), artifact])
    with pytest.raises(ValueError, match="wandb artifact get"):
        trainer.validate(detector(dm), dm, verbose=False)


def test_too_few_true_positives_is_not_enough_evidence_logged_and_warned_never_a_stop(scenes_root, tmp_path):
    """Per-class thresholds on a handful of true positives are a coin toss: the callback says so
    and keeps training, even with action='fail'."""
    focus = FocusRegressionCallback(max_drift=None, min_energy_in_box=1.0, action="fail", min_class_count=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(scenes_root, tmp_path, [focus])
    assert trainer.global_step == 4 and focus.num_violations == 0
    said = [str(w.message) for w in caught if "not enough evidence for a verdict" in str(w.message)]
    assert len(said) == 2 and all("fewer than the 1000 needed" in m or "no true positive" in m for m in said)
    run = newest_offline_run(tmp_path)
    assert all(v >= 1 for v in scalar_history(run, "focus/insufficient_evidence"))
    assert scalar_history(run, "focus/violations") == [0.0, 0.0]
    with pytest.raises(ValueError, match="min_class_count must be an integer >= 1"):
        FocusRegressionCallback(min_class_count=0)
