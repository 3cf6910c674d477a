"""PredictionOverlayCallback under 2-process CPU DDP: one W&B run, all probe images, no hang.

Lightning's ``strategy="ddp"`` re-launches the running script for the other ranks, so the
fit runs as a standalone script in a subprocess with a timeout, as in Lightning's own
suite (its ``ddp`` tests are "standalone" tests run outside pytest's process;
``ddp_spawn`` would pickle the trainer and is not what users run on clusters).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from wandb_utils import finished_run, image_events

from detlens.data import SyntheticDataModule
from wandb_offline import find_offline_runs

SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from detlens.callbacks import PredictionOverlayCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import TorchvisionDetector


    class RankOneFails(PredictionOverlayCallback):
        # rank 1 raises in its first event: rank 0 must warn, not wait forever in the gather
        reads_validation_forward = False  # every probe image through explain_shard
        def explain_shard(self, pl_module, images, targets, indices):
            if pl_module.global_rank == 1 and self.num_logging_events == 0:
                raise RuntimeError("rank one exploded")
            return super().explain_shard(pl_module, images, targets, indices)


    if __name__ == "__main__":
        root, save_dir = sys.argv[1], sys.argv[2]
        dm = SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=64, batch_size=2, horizontal_flip=False)
        model = TorchvisionDetector(
            "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names,
            min_size=64, max_size=64, fpn_channels=16, representation_size=32, rpn_proposals_train=50,
            rpn_proposals_test=20, box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128],
            score_thresh=0.0, warmup_steps=1,
        )
        callbacks = [
            # 3 probe images: rank 0 validates (and reads) 0 and 2, rank 1 reads 3 (unequal detection counts)
            PredictionOverlayCallback(score_threshold=0.0, max_detections=7, num_probe_images=3),
            # 1 probe image: rank 1's shard is empty
            PredictionOverlayCallback(score_threshold=0.0, probe_indices=[2], log_key="single"),
            RankOneFails(score_threshold=0.0, num_probe_images=2, log_key="flaky"),
        ]
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=WandbLogger(offline=True, save_dir=save_dir),
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
    root = tmp_path / "scenes"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=64, batch_size=2)
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "default"}

    done = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path / "logs")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    runs = find_offline_runs(tmp_path / "logs")
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])
    events = image_events(run, "predictions/probe")
    assert [e.global_step for e in events] == [2, 4]
    assert all([c.split(" (")[0] for c in e.captions] == ["img 0", "img 2", "img 3"] for e in events)
    assert [len(e.captions) for e in image_events(run, "single/probe")] == [1, 1]
    # The failing rank cost one warning and that event; the next event logged normally.
    assert done.stderr.count("RankOneFails skipped step 2") == 1 and "rank 1: RuntimeError: rank one exploded" in done.stderr
    assert [e.global_step for e in image_events(run, "flaky/probe")] == [4]
    assert len(run.history_of("val/mAP")) == 2
