"""Every detlens callback under the precisions and trainer modes users run.

* ``bf16-mixed`` and ``32-true`` on the CPU: every callback explains and logs its media
  (explanations run in the trainer's precision context, docs/DESIGN.md rule 2);
* ``trainer.validate()`` / ``trainer.test()`` run under ``torch.inference_mode()``, where
  no tensor can enter autograd unless detlens steps out of it: each callback logs once;
* ``fast_dev_run`` and the sanity check produce no media and no work;
* a model with a ``torch.compile``d part works, under the same stable keys.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes, tiny_detr
from wandb_utils import image_events, newest_offline_run

pytestmark = pytest.mark.usefixtures("one_thread")

MEDIA = ["predictions/probe", "gradcam/probe", "attention/entropy_heatmap", "embeddings/scatter", "embeddings/table"]
SPATIAL = "attention_maps/spatial/backbone.body.layer3_attention"


def detlens_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "[detlens]" in str(w.message)]


def steps_with(run, key: str) -> list[int]:
    return [row["trainer/global_step"] for row in run.history if key in row]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_every_callback_logs_its_media_at_cpu_precision(precision, scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callbacks = every_callback(every_n_steps=1)
    fit = quiet_trainer(
        precision=precision, callbacks=callbacks, limit_val_batches=1, logger=WandbLogger(offline=True, save_dir=tmp_path)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(faster_rcnn(dm), dm)
    wandb.finish()

    assert detlens_warnings(caught) == []
    run = newest_offline_run(tmp_path)
    for key in [*MEDIA, SPATIAL]:
        assert steps_with(run, key) == [1, 2], key
    assert steps_with(run, "attention/entropy/backbone.body.layer3_attention/head1") == [0, 1]
    for event in image_events(run, "gradcam/probe"):
        assert all(f.is_file() for f in event.image_files(run))


@pytest.mark.slow
def test_validate_and_test_under_inference_mode_log_once_each(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callbacks = every_callback(every_n_steps=None, every_n_epochs=1)
    model = tiny_detr(dm)  # decoder/encoder/rollout maps and per-query Grad-CAM, all needing autograd
    logger = WandbLogger(offline=True, save_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=callbacks, limit_val_batches=1, inference_mode=True, logger=logger).validate(model, dm)
        assert [c.num_logging_events for c in callbacks] == [1] * 5
        # Without a DataModule: the probe set is read from the test loader's dataset.
        quiet_trainer(callbacks=callbacks, limit_test_batches=1, inference_mode=True, logger=logger).test(
            model, dataloaders=dm.val_dataloader()
        )
    wandb.finish()

    assert detlens_warnings(caught) == []
    assert [c.num_logging_events for c in callbacks] == [2] * 5
    run = newest_offline_run(tmp_path)
    for key in [*MEDIA, "attention_maps/decoder/layer1", "attention_maps/rollout"]:
        assert len(steps_with(run, key)) == 2, key
    assert any(k.startswith("val/") for row in run.history for k in row)


@pytest.mark.parametrize(
    "overrides",
    [dict(fast_dev_run=True), dict(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=2)],
    ids=["fast_dev_run", "sanity_check"],
)
def test_fast_dev_run_and_the_sanity_check_explain_nothing(overrides, scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    callbacks = every_callback(every_n_steps=None, every_n_epochs=1)
    fit = quiet_trainer(callbacks=callbacks, logger=WandbLogger(offline=True, save_dir=tmp_path), **overrides)
    fit.fit(faster_rcnn(dm), dm)
    wandb.finish()

    entropy = callbacks[3]
    if overrides.get("fast_dev_run"):
        # Lightning swaps every logger for a DummyLogger: the counters are the record.
        assert [c.num_logging_events for c in callbacks] == [0] * 5
        assert entropy._last_train_step == -1, "the entropy callback read a training forward under fast_dev_run"
        return
    # One real epoch: one event per callback, after the epoch's validation; none in the sanity check.
    assert [c.num_logging_events for c in callbacks] == [1] * 5
    run = newest_offline_run(tmp_path)
    media_steps = {key: steps_with(run, key) for key in [*MEDIA, SPATIAL]}
    assert media_steps == {key: [1] for key in media_steps}


@pytest.mark.slow
def test_a_model_with_a_compiled_backbone_is_explained_under_the_uncompiled_keys(scenes_root, tmp_path, finish_wandb):
    """``torch.compile`` on part of the model works; the keys must not grow ``_orig_mod``.

    The ``eager`` backend runs TorchDynamo's tracing (what meets detlens' hooks) without
    inductor's C++ code generation, which takes minutes on a CPU-only test machine.
    """
    dm = scenes(scenes_root)
    model = faster_rcnn(dm)
    model.model.backbone = torch.compile(model.model.backbone, backend="eager")
    callbacks = every_callback(every_n_steps=1)
    fit = quiet_trainer(callbacks=callbacks, limit_val_batches=1, logger=WandbLogger(offline=True, save_dir=tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(model, dm)
    wandb.finish()

    assert detlens_warnings(caught) == []
    assert [c.num_logging_events for c in callbacks] == [2] * 5
    keys = {k for row in newest_offline_run(tmp_path).history for k in row}
    assert not [k for k in keys if "_orig_mod" in k], "compiling a submodule changed the log keys"
    assert {SPATIAL, "attention/entropy/backbone.body.layer3_attention/head0"} <= keys
