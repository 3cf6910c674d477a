"""BoundaryCallback in real fits (training untouched, margins logged and recorded) and the margin gate of `detlens compare`."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import image_events, newest_offline_run, scalar_history

from detlens.callbacks.boundary import BoundaryCallback
from detlens.cli import EXIT_INSUFFICIENT, EXIT_OK, EXIT_REGRESSION, main
from detlens.data import SyntheticDataModule
from detlens.focus.record import BoundaryImage, BoundaryPoint, FocusRecordWriter, read_focus_record
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64

pytestmark = [pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


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
    )


def trainer(**overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def callback(**kw) -> BoundaryCallback:
    # an early model scores low: attack its two best detections above 0.05, a short budget
    args = dict(top_k=2, score_threshold=0.05, steps=4, num_probe_images=2, every_n_epochs=1)
    args.update(kw)
    return BoundaryCallback(**args)


@pytest.mark.numerics
def test_a_fit_logs_margins_overlays_and_the_focus_record_and_the_report_shows_them(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    cb = callback()
    pl.seed_everything(0)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[cb]).fit(detector(dm), dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)
    events = image_events(run, "boundary/probe")
    assert [e.global_step for e in events] == [2, 4]
    assert all(" margins: " in c for e in events for c in e.captions)
    assert [len(p["box_data"]) for p in events[-1].boxes(run, "predictions")] == [2, 2]
    per_image = scalar_history(run, "boundary/detections_per_image")
    not_lost = scalar_history(run, "boundary/not_lost_share")
    assert per_image == [2.0, 2.0] and len(not_lost) == 2 and all(0.0 <= v <= 1.0 for v in not_lost)
    record = read_focus_record(run.run_dir)
    points = record.boundary_points("boundary")
    assert [p.step for p in points] == [2, 4] and all(p.norm == "l2" and p.steps == 4 for p in points)
    for p in points:
        margins, _ = p.margins()
        assert margins.shape == (4,)
        lost = np.isfinite(margins)
        assert (margins[lost] >= 0).all() and (margins[lost] <= p.epsilon + 1e-6).all()
        if lost.any():
            assert "margin_median" in p.summary()
    out = tmp_path / "report.html"
    assert main(["report", str(run.run_dir), "--out", str(out)]) == EXIT_OK
    assert "Decision-boundary margin" in out.read_text()


def fit_weights(dm: SyntheticDataModule, callbacks: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], tuple]:
    pl.seed_everything(0)
    model = detector(dm)
    trainer(max_epochs=1, deterministic=True, callbacks=callbacks, limit_val_batches=0).fit(model, dm)
    rng = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, rng


@pytest.mark.numerics
def test_a_fit_with_the_callback_ends_with_bit_identical_weights_and_rng(scenes_root):
    dm = scenes(scenes_root)
    cb = callback(every_n_epochs=None, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_callback, rng_with = fit_weights(dm, [cb])
    assert not [str(w.message) for w in caught if "[detlens]" in str(w.message)], "the callback must not fail"
    without, rng_without = fit_weights(scenes(scenes_root), [])
    assert cb.num_logging_events >= 2
    assert not [k for k in without if not torch.equal(with_callback[k], without[k])]
    assert torch.equal(rng_with[0], rng_without[0]) and np.array_equal(rng_with[1], rng_without[1])
    assert rng_with[2] == rng_without[2]


@pytest.mark.numerics
def test_validate_under_inference_mode(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    cb = callback()
    assert trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[cb]).validate(detector(dm), dm, verbose=False)
    wandb.finish()
    (event,) = image_events(newest_offline_run(tmp_path), "boundary/probe")
    assert cb.num_logging_events == 1 and event.captions[0].count(" margins: ") == 1


def test_misconfigurations_are_explained_at_construction():
    for kwargs, match in (({"norm": "l1"}, "norm"), ({"score_threshold": 0.0}, "score_threshold"),
                          ({"steps": -1}, "steps"), ({"epsilon": 0}, "epsilon"), ({"top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=match):
            BoundaryCallback(**kwargs)


# ------------------------------------------------------------------ the compare gate
def record(path, margins: list[float], epsilon: float = 0.05) -> None:
    """A focus record with one boundary point: one detection per probe image, a box that does not move."""
    writer = FocusRecordWriter(path)
    images = [BoundaryImage(i, np.array([[10, 10, 30, 30]], np.float32), np.array([1]), np.array([0.9], np.float32),
                            np.array([m], np.float32), np.array([-1])) for i, m in enumerate(margins)]
    writer.write(BoundaryPoint("boundary", 100, 1, "l2", epsilon, 20, 0.5, images, {1: "circle"}))


def compare(tmp_path, base: list[float], cand: list[float], *extra: str) -> int:
    a, b = tmp_path / "a", tmp_path / "b"
    record(a, base)
    record(b, cand)
    return main(["compare", str(a), str(b), "--out", str(tmp_path / "r.html"), "--max-drift", "-1",
                 "--max-margin-drop", "0.005", *extra])


def test_compare_fails_on_a_margin_drop_the_interval_confirms(tmp_path):
    base = [0.030, 0.032, 0.028, 0.031, 0.029, 0.030, 0.033, 0.027]
    assert compare(tmp_path / "same", base, base) == EXIT_OK
    assert compare(tmp_path / "drop", base, [m / 3 for m in base]) == EXIT_REGRESSION
    # larger margins (and detections no longer lost within the budget) are no drop
    assert compare(tmp_path / "up", base, [float("nan")] * 4 + [m * 1.5 for m in base[4:]]) == EXIT_OK
    assert "margin drop from the baseline" in (tmp_path / "drop" / "r.html").read_text()


def test_compare_says_when_the_margins_are_not_enough_evidence(tmp_path):
    assert compare(tmp_path / "few", [0.03, 0.03], [0.01, 0.01]) == EXIT_INSUFFICIENT
    a = tmp_path / "none"
    record(a / "a", [0.03] * 8)
    FocusRecordWriter(a / "b")  # a run without BoundaryCallback
    code = main(["compare", str(a / "a"), str(a / "b"), "--out", str(a / "r.html"), "--max-drift", "-1",
                 "--max-margin-drop", "0.005"])
    assert code == EXIT_INSUFFICIENT
