"""Attention callbacks under 2-process CPU DDP: entropy logged once, from rank 0, as the mean over both ranks.

Lightning's ``strategy="ddp"`` re-launches the running script for the other rank, so the
fit runs as a standalone script in a subprocess with a timeout (see test_callbacks_ddp.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from wandb_utils import finished_run, image_events

from detlens.data import SyntheticDataModule
from wandb_offline import find_offline_runs

SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import WandbLogger

    from detlens.callbacks.attention_entropy import AttentionEntropyCallback
    from detlens.callbacks.attention_maps import AttentionMapCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import DETR


    class RecordingEntropy(AttentionEntropyCallback):
        # saves each rank's own entropy sums of every watched training step, to check rank 0's pooling
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            if self._armed_step is not None:
                step, monitor = self._armed_step, self._train_monitor
                original = monitor.collect_sums

                def recording():
                    sums = original()
                    torch.save(sums, f"{out}/sums_rank{trainer.global_rank}_step{step}.pt")
                    return sums

                monitor.collect_sums = recording
                try:
                    super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
                finally:
                    monitor.collect_sums = original
            else:
                super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        root, save_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
        dm = SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=64, batch_size=2, horizontal_flip=False)
        model = DETR(
            num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", backbone_stage="layer3",
            hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, dropout=0.0, num_queries=8,
            image_size=64, score_thresh=0.0, warmup_steps=1,
        )
        callbacks = [
            RecordingEntropy(every_n_train_steps=1, num_probe_images=3),  # probe shards of 2 and 1 images
            AttentionMapCallback(top_k=2, num_probe_images=3),
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
def test_two_rank_ddp_logs_entropy_once_from_rank_zero_pooled_over_both_ranks(tmp_path):
    root = tmp_path / "scenes"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=64, batch_size=2)
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    sums_dir = tmp_path / "sums"
    sums_dir.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "default"}

    done = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path / "logs"), str(sums_dir)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    runs = find_offline_runs(tmp_path / "logs")
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])

    layers = ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]
    for layer in layers:
        for head in range(4):
            key = f"attention/entropy/{layer}/head{head}"
            rows = [row for row in run.history if key in row]
            # 8 images / (2 ranks x batch 2) = 2 steps per epoch, 2 epochs: one row per step, not one per rank.
            assert [row["trainer/global_step"] for row in rows] == [0, 1, 2, 3], key
            for row in rows:
                step = row["trainer/global_step"]
                parts = [torch.load(sums_dir / f"sums_rank{r}_step{step}.pt")[f"model.{layer}"] for r in (0, 1)]
                if layer.startswith("encoder"):  # decoder layer 0's self-attention sees only the learned queries
                    assert not torch.equal(parts[0][0], parts[1][0])  # each rank read its own batch
                pooled = (parts[0][0][head] + parts[1][0][head]) / (parts[0][1] + parts[1][1])
                assert row[key] == pytest.approx(float(pooled), rel=1e-6)
            probe_key = f"attention/entropy_probe/{layer}/head{head}"
            assert [row["trainer/global_step"] for row in run.history if probe_key in row] == [2, 4]
    assert [e.global_step for e in image_events(run, "attention/entropy_heatmap")] == [2, 4]
    assert [row["trainer/global_step"] for row in run.history if "attention/collapse" in row] == [0, 1, 2, 3]
    # Every probe image's overlays arrive on rank 0, whichever rank explained it.
    for event in image_events(run, "attention_maps/decoder/layer0"):
        assert [c.split(" (id")[0] for c in event.captions] == ["img 0", "img 0", "img 2", "img 2", "img 3", "img 3"]
