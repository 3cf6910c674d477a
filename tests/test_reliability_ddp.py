"""Every detlens callback under 2-process CPU DDP, at the shapes that make gathers hang.

One fit (a standalone script in a subprocess with a timeout, as in
``test_callbacks_ddp.py``) holds, at once:

* unequal probe shards: 3 probe images over 2 ranks (rank 0 explains images 0 and 3,
  rank 1 image 2);
* a rank with zero detections: at the step-1 event rank 1's detector keeps nothing
  (its RoI score threshold is raised to 1.0 for that step), so its results are empty
  while rank 0's are not; at the step-2 event both ranks detect;
* a probe set smaller than the world size: a second instance of every callback explains
  one image, so rank 1's shard is empty.

It must finish (no hang) within the timeout, write one W&B run, and the media must hold
every rank's shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from wandb_utils import finished_run, image_events

from wandb_offline import find_offline_runs

SCRIPT = textwrap.dedent(
    """
    import sys

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import WandbLogger

    sys.path.insert(0, sys.argv[3])
    from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes

    from detlens.callbacks.attention_entropy import AttentionEntropyCallback
    from detlens.callbacks.attention_maps import AttentionMapCallback
    from detlens.callbacks.embeddings import BoxEmbeddingCallback
    from detlens.callbacks.gradcam import GradCAMCallback
    from detlens.callbacks.prediction_overlay import PredictionOverlayCallback


    class RankOneDetectsNothingAtStepOne(pl.Callback):
        # listed first, so it runs before the detlens callbacks' on_train_batch_end
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            if trainer.global_rank == 1:
                pl_module.model.roi_heads.score_thresh = 1.0 if trainer.global_step == 1 else 0.0


    if __name__ == "__main__":
        torch.set_num_threads(1)
        root, save_dir = sys.argv[1], sys.argv[2]
        pl.seed_everything(0)
        dm = scenes(root, batch_size=4)  # 8 images / 2 ranks: one step per epoch
        one = dict(every_n_epochs=None, every_n_steps=1, probe_indices=[1])
        callbacks = [
            RankOneDetectsNothingAtStepOne(),
            *every_callback(every_n_steps=1, num_probe_images=3),
            PredictionOverlayCallback(score_threshold=0.0, log_key="one/predictions", **one),
            GradCAMCallback(score_threshold=0.0, top_k=2, log_key="one/gradcam", **one),
            AttentionMapCallback(top_k=2, reference_points="grid", grid_size=2, log_key="one/attention_maps", **one),
            AttentionEntropyCallback(every_n_train_steps=None, log_key="one/attention", **one),
            BoxEmbeddingCallback(method="pca", score_threshold=0.0, max_detections=5, thumbnail_size=0,
                                 log_key="one/embeddings", **one),
        ]
        trainer = quiet_trainer(
            devices=2, strategy="ddp", max_epochs=2, limit_val_batches=1, callbacks=callbacks,
            logger=WandbLogger(offline=True, save_dir=save_dir),
        )
        trainer.fit(faster_rcnn(dm), dm)
        if trainer.is_global_zero:
            import wandb
            wandb.finish()
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from reliability_utils import scenes

    tmp_path = tmp_path_factory.mktemp("ddp")
    root = tmp_path / "scenes"
    scenes(str(root))
    script = tmp_path / "fit_ddp_reliability.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path / "logs"), os.path.dirname(__file__)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,  # a hang fails here
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = find_offline_runs(tmp_path / "logs")
    return done, runs


def probe_images(captions: list[str]) -> list[int]:
    """``"img 2 (id 7) · step 1"`` -> 2, per caption."""
    return [int(c.split()[1]) for c in captions]


def table_rows(run, key: str) -> list[list[dict]]:
    """Per event, the rows of the W&B table logged under ``key`` as column -> value dicts."""
    out = []
    for _, value in run.history_of(key):
        data = json.loads((run.run_dir / "files" / value["path"]).read_text())
        out.append([dict(zip(data["columns"], row)) for row in data["data"]])
    return out


@pytest.mark.slow
@pytest.mark.ddp
def test_unequal_shards_an_empty_rank_and_a_tiny_probe_set_finish_in_one_wandb_run(ddp_run):
    done, runs = ddp_run
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    assert "[detlens]" not in done.stderr, "no callback may skip an event: " + done.stderr[-3000:]
    # Rank 1's process is a child of rank 0's: an exception there does not change the exit code.
    assert "Traceback" not in done.stderr, "a rank raised: " + done.stderr[-3000:]
    run = finished_run(runs[0])
    assert len(run.history_of("val/mAP")) == 2


@pytest.mark.slow
@pytest.mark.ddp
def test_media_hold_every_ranks_shard_including_a_rank_without_detections(ddp_run):
    _, runs = ddp_run
    run = finished_run(runs[0])
    # Probe images 0 and 3 are rank 0's, image 2 is rank 1's; two events (steps 1 and 2).
    for key in ("predictions/probe", "gradcam/probe"):
        events = image_events(run, key)
        assert [e.global_step for e in events] == [1, 2], key
        assert all(probe_images(e.captions) == [0, 2, 3] for e in events), key
    predictions = [e.boxes(run, "predictions") for e in image_events(run, "predictions/probe")]
    assert [len(p["box_data"]) for p in predictions[0]][1] == 0, "rank 1 kept no detection at step 1"
    assert all(len(p["box_data"]) > 0 for p in predictions[1])
    heatmaps = image_events(run, "attention/entropy_heatmap")
    assert [e.captions for e in heatmaps] == [[f"probe set, 3 images · step {s}"] for s in (1, 2)]
    # Attention maps are drawn per detection: at step 1 only rank 0's images have some.
    maps = [image_events(run, k) for k in {k for row in run.history for k in row if k.startswith("attention_maps/")}]
    assert maps
    for events in maps:
        assert [e.global_step for e in events] == [1, 2]
        assert sorted(set(probe_images(events[0].captions))) == [0, 3]
        assert sorted(set(probe_images(events[1].captions))) == [0, 2, 3]
    tables = table_rows(run, "embeddings/table")
    assert [sorted({r["probe_index"] for r in rows}) for rows in tables] == [[0, 3], [0, 2, 3]]


@pytest.mark.slow
@pytest.mark.ddp
def test_a_probe_set_smaller_than_the_world_size_is_explained_by_rank_zero_alone(ddp_run):
    _, runs = ddp_run
    run = finished_run(runs[0])
    for key in ("one/predictions/probe", "one/gradcam/probe", "one/attention_maps/spatial/backbone.body.layer3_attention"):
        events = image_events(run, key)
        assert [e.global_step for e in events] == [1, 2], key
        assert all(set(probe_images(e.captions)) == {1} for e in events), key
    assert [e.captions for e in image_events(run, "one/attention/entropy_heatmap")] == [
        [f"probe set, 1 images · step {s}"] for s in (1, 2)
    ]
    tables = table_rows(run, "one/embeddings/table")
    assert len(tables) == 2 and all(rows and {r["probe_index"] for r in rows} == {1} for rows in tables)
