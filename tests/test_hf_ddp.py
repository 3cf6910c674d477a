"""transformers' Deformable DETR under 2-process CPU DDP, every explaining callback on: one W&B run.

Three probe images over two ranks (rank 0 explains two, rank 1 one: unequal detection counts
in every gather), run as a standalone script like the other DDP tests (see test_callbacks_ddp.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from wandb_offline import find_offline_runs
from wandb_utils import finished_run, image_events

from detlens.data import SyntheticDataModule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ddp,
    pytest.mark.skipif(sys.version_info < (3, 11), reason="detlens[hf] (transformers 5) needs Python >= 3.11"),
]

SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from detlens.callbacks import AttentionEntropyCallback, AttentionMapCallback, BoxEmbeddingCallback, GradCAMCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import HFDetector

    if __name__ == "__main__":
        root, save_dir = sys.argv[1], sys.argv[2]
        pl.seed_everything(0)
        dm = SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=64, batch_size=2, horizontal_flip=False)
        model = HFDetector(
            architecture="deformable_detr", num_classes=dm.num_classes, class_names=dm.class_names,
            config=dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_queries=8),
            score_thresh=0.0, warmup_steps=1,
        )
        probes = dict(num_probe_images=3)
        callbacks = [
            GradCAMCallback(score_threshold=0.0, top_k=2, **probes),
            AttentionMapCallback(top_k=2, **probes),
            AttentionEntropyCallback(every_n_train_steps=1, **probes),
            BoxEmbeddingCallback(method="pca", score_threshold=0.0, max_detections=3, thumbnail_size=16, **probes),
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


def test_two_rank_ddp_fit_of_a_deformable_detector_logs_one_run_with_every_probe_image(tmp_path):
    root = tmp_path / "scenes"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=64, batch_size=2)
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}

    done = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path / "logs")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped step" not in done.stderr, done.stderr[-3000:]
    runs = find_offline_runs(tmp_path / "logs")
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])
    for key in ("gradcam/probe", "attention_maps/decoder/layer1", "attention_maps/decoder/layer1/level0"):
        events = image_events(run, key)
        assert len(events) == 1, key
        probes = sorted({c.split(" (")[0] for c in events[0].captions})
        assert probes == ["img 0", "img 2", "img 3"], (key, probes)
    assert any(k.startswith("attention/") for row in run.history for k in row)
    assert image_events(run, "embeddings/scatter")
