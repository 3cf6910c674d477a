"""Faults a long cluster run meets: a failing logger, a killed job, a resumed job.

* The logger raising mid-run (disk full, the W&B process gone) costs one warning per
  callback and event, never the training run; the next event logs normally.
* A run killed mid-way (``SIGKILL`` to the whole process group, as when a node is lost)
  leaves an offline W&B folder that :func:`wandb_offline.read_offline_run` still parses,
  with every logging point before the kill, and a focus record that reads back.
* Resuming from a checkpoint continues every callback's cadence counters and baselines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Any

import pytest
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes
from wandb_utils import image_events, newest_offline_run

from wandb_offline import find_offline_runs, read_offline_run

pytestmark = pytest.mark.usefixtures("one_thread")

DETLENS_PREFIXES = ("predictions/", "gradcam/", "attention_maps/", "attention/", "embeddings/")


class DiskFullAtStep(WandbLogger):
    """A W&B logger whose writes of detlens' media and scalars fail at one global step.

    Lightning's own metrics still go through, as they do when only large media writes
    hit a full disk.
    """

    def __init__(self, failing_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failing_step = failing_step
        self.refused = 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step == self.failing_step and any(k.startswith(DETLENS_PREFIXES) for k in metrics):
            self.refused += 1
            raise OSError(28, "No space left on device")
        super().log_metrics(metrics, step)


@pytest.mark.slow
def test_a_logger_failing_mid_run_costs_a_warning_per_callback_not_the_run(scenes_root, tmp_path):
    dm = scenes(scenes_root)
    callbacks = every_callback(every_n_steps=1)
    logger = DiskFullAtStep(failing_step=2, offline=True, save_dir=tmp_path)
    fit = quiet_trainer(max_epochs=2, limit_val_batches=1, callbacks=callbacks, logger=logger)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit.fit(faster_rcnn(dm), dm)
    finally:
        wandb.finish()

    assert fit.global_step == 4 and [c.num_logging_events for c in callbacks] == [4] * 5
    failures = [str(w.message) for w in caught if "No space left on device" in str(w.message)]
    # One warning per refused write (the entropy callback writes twice at step 2: the training reading, the probe set).
    assert len(failures) == logger.refused >= len(callbacks)
    assert all("failed to log media at step 2" in m and "OSError" in m for m in failures)
    run = newest_offline_run(tmp_path)
    for key in ("predictions/probe", "gradcam/probe", "attention/entropy_heatmap", "embeddings/scatter"):
        assert [e.global_step for e in image_events(run, key)] == [1, 3, 4], key
    assert len(run.history_of("val/mAP")) == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import sys

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import WandbLogger

    sys.path.insert(0, sys.argv[3])
    from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes

    if __name__ == "__main__":
        torch.set_num_threads(1)
        root, save_dir = sys.argv[1], sys.argv[2]
        dm = scenes(root)
        trainer = quiet_trainer(
            max_epochs=1000, limit_val_batches=1, callbacks=every_callback(every_n_steps=1),
            logger=WandbLogger(offline=True, save_dir=save_dir),
        )
        trainer.fit(faster_rcnn(dm), dm)  # killed long before it ends
    """
)


@pytest.mark.slow
def test_a_run_killed_mid_way_leaves_a_readable_offline_run_and_focus_record(scenes_root, tmp_path):
    script = tmp_path / "fit_forever.py"
    script.write_text(KILL_SCRIPT)
    save_dir = tmp_path / "logs"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, str(script), scenes_root, str(save_dir), os.path.dirname(__file__)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    seen = 0
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            runs = find_offline_runs(save_dir)
            if runs:
                seen = len(image_events(read_offline_run(runs[0]), "gradcam/probe"))
                if seen >= 3:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, f"the fit ended early: {proc.stderr.read().decode()[-3000:]}"
        assert seen >= 3, "no logging points reached the run file in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the fit and W&B's writer process, as when a node dies
        proc.wait(timeout=30)
        proc.stderr.close()

    (run_dir,) = find_offline_runs(save_dir)
    run = read_offline_run(run_dir)
    assert run.exit_code is None, "a killed run has no exit record"
    assert run.run_id is not None and run.skipped_chunks == 0
    events = image_events(run, "gradcam/probe")
    assert len(events) >= seen
    # Every logging point that reached the file is whole: its step in order, its images on disk.
    assert [e.global_step for e in events] == list(range(1, len(events) + 1))
    for event in events[:seen]:
        assert len(event.captions) == 2 and all(f.is_file() for f in event.image_files(run))

    from detlens.focus.record import read_focus_record

    record = read_focus_record(run_dir)
    steps = [p.step for p in record.map_points("gradcam")]
    assert steps[:seen] == list(range(1, seen + 1)), steps


@pytest.mark.slow
def test_resume_continues_every_callbacks_cadence_and_baselines(scenes_root, tmp_path):
    dm = scenes(scenes_root)
    first = every_callback(every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=1, limit_val_batches=1, callbacks=[*first, checkpoint], enable_checkpointing=True).fit(
        faster_rcnn(dm), dm
    )
    assert [c.num_logging_events for c in first] == [2] * 5

    resumed = every_callback(every_n_steps=1)
    fit = quiet_trainer(max_epochs=2, limit_val_batches=1, callbacks=resumed)
    fit.fit(faster_rcnn(dm), dm, ckpt_path=str(tmp_path / "last.ckpt"))

    assert fit.global_step == 4
    # Two more events (steps 3 and 4): none repeated at the resume step, none lost.
    assert [c.num_logging_events for c in resumed] == [4] * 5
    assert [c.probe_indices for c in resumed] == [c.probe_indices for c in first]
    gradcam, entropy = resumed[1], resumed[3]
    # Grad-CAM's peak reference is the one fixed at the first run's first event.
    assert gradcam.scale.state_dict() == first[1].scale.state_dict() != {}
    # The entropy collapse window continues the first run's readings (steps 0, 1) with steps 2, 3.
    before = first[3].collapse.state_dict()["history"]
    after = entropy.collapse.state_dict()["history"]
    assert before and after.keys() == before.keys()
    assert all([step for step, _ in after[k]] == [0, 1, 2, 3] for k in after)
    assert all(after[k][:2] == before[k] for k in after)
