"""BoxEmbeddingCallback in real fits: the W&B table, scatter image and scalars on disk; DDP; training untouched."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from wandb.proto import wandb_internal_pb2
from wandb_utils import finished_run, image_events, newest_offline_run, scalar_history

from detlens.callbacks.embeddings import TABLE_COLUMNS, BoxEmbeddingCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import TorchvisionDetector
from wandb_offline import find_offline_runs
from wandb_offline import OfflineRun, read_records

pytestmark = pytest.mark.numerics  # trains or checks trained-model numbers: `make test` runs it twice

SIZE = 64
torch.set_num_threads(1)
REPRESENTATION = 32


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
        max_size=SIZE, fpn_channels=16, representation_size=REPRESENTATION, rpn_proposals_train=50,
        rpn_proposals_test=20, box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0,
        warmup_steps=1,
    )


def trainer(**overrides) -> pl.Trainer:
    kwargs = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


@pytest.fixture
def wandb_data_dir(tmp_path, monkeypatch):
    """W&B stages logged tables (a run artifact) under its data dir: keep that in tmp_path."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    yield
    wandb.finish()


def logged_tables(run: OfflineRun, key: str) -> list[dict]:
    """Every ``wandb.Table`` logged under ``key``, as W&B will upload it on sync.

    ``{"rows": [{column: cell}], "image_files": {row: Path}, "history": history value}``.
    The run's ``files/media/table/`` copy has image cells replaced by ``"Image"``; the
    full table (image cells pointing at PNGs) is a ``run_table`` artifact whose files W&B
    stages under its data dir until the run is synced.
    """
    staged = {}
    payloads, _, _ = read_records(next(run.run_dir.glob("run-*.wandb")))
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "run_table":
            staged.update({c.path: Path(c.local_path) for c in record.artifact.manifest.contents})
    out = []
    for _, value in run.history_of(key):
        assert value["_type"] == "table-file"
        flat = json.loads((run.run_dir / "files" / value["path"]).read_text())
        full = json.loads(staged[f"{key}.table.json"].read_text())
        assert full["columns"] == flat["columns"] and len(full["data"]) == len(flat["data"]) == value["nrows"]
        rows = [dict(zip(flat["columns"], cells)) for cells in flat["data"]]
        images = {}
        if "thumbnail" in full["columns"]:
            col = full["columns"].index("thumbnail")
            images = {i: staged[cells[col]["path"]] for i, cells in enumerate(full["data"])}
        out.append({"rows": rows, "image_files": images, "history": value})
    return out


def test_fit_logs_one_row_per_detection_a_scatter_image_and_scalars(scenes_root, tmp_path, wandb_data_dir):
    dm = scenes(scenes_root)
    full = BoxEmbeddingCallback(score_threshold=0.0, max_detections=10, num_probe_images=4, thumbnail_size=24)
    bounded = BoxEmbeddingCallback(method="pca", score_threshold=0.0, max_detections=10, num_probe_images=4,
                                   max_rows=15, thumbnail_size=0, log_embedding=False, log_key="bounded")
    pl.seed_everything(0)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[full, bounded]).fit(detector(dm), dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)

    (table,) = logged_tables(run, "embeddings/table")
    rows = table["rows"]
    detections = scalar_history(run, "embeddings/detections")
    assert detections == [len(rows)] and 4 <= len(rows) <= 40  # 4 probe images, at most 10 each
    assert list(rows[0]) == list(TABLE_COLUMNS)
    names = set(dm.class_names.values())
    val_ids = {dm.val_dataset[i][1]["image_id"] for i in range(4)}
    for row in rows:
        assert row["class"] in names and dm.class_names[row["label"]] == row["class"]
        assert (row["status"], row["fp_kind"] == "") in {("TP", True), ("FP", False)}
        assert row["fp_kind"] in {"", "duplicate", "wrong_class", "localization", "class_and_localization", "background"}
        assert row["image_id"] in val_ids and row["probe_index"] in range(4)
        assert len(row["embedding"]) == REPRESENTATION and len(row["box"]) == 4
        assert math.isfinite(row["x"]) and math.isfinite(row["y"]) and 0.0 <= row["score"] <= 1.0
    assert {r["probe_index"] for r in rows} == {0, 1, 2, 3}
    # Thumbnails are real crops of the requested size, one per row.
    assert len(table["image_files"]) == len(rows)
    with Image.open(table["image_files"][0]) as thumb:
        assert thumb.size == (24, 24)

    tp, fp = scalar_history(run, "embeddings/tp"), scalar_history(run, "embeddings/fp")
    assert tp[0] == sum(r["status"] == "TP" for r in rows) and tp[0] + fp[0] == len(rows)
    assert len(scalar_history(run, "embeddings/fn")) == 1
    (trust,) = scalar_history(run, "embeddings/trustworthiness")
    assert 0.5 < trust <= 1.0
    assert len(scalar_history(run, "embeddings/silhouette")) == 1

    (scatter,) = image_events(run, "embeddings/scatter")
    assert scatter.global_step == 2 and scatter.captions == [f"tsne of {len(rows)} detections · step 2"]
    with Image.open(scatter.image_files(run)[0]) as png:
        assert png.size == (960, 640)

    # The bounded instance: a stratified sample of 15 rows, no thumbnails, no embedding column.
    (small,) = logged_tables(run, "bounded/table")
    assert len(small["rows"]) == 15 and scalar_history(run, "bounded/points") == [15.0]
    assert "thumbnail" not in small["rows"][0] and "embedding" not in small["rows"][0]
    assert scalar_history(run, "bounded/detections") == [len(rows)], "counts cover every detection"
    classes_all = {r["label"] for r in rows}
    assert {r["label"] for r in small["rows"]} == classes_all or len(classes_all) > 15


def fit_weights(dm, callbacks):
    pl.seed_everything(0)
    model = detector(dm)
    trainer(deterministic=True, callbacks=callbacks, limit_val_batches=0).fit(model, dm)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_a_fit_with_the_callback_ends_with_bit_identical_weights(scenes_root):
    dm = scenes(scenes_root)
    callback = BoxEmbeddingCallback(score_threshold=0.0, every_n_steps=1, num_probe_images=2, thumbnail_size=0)
    with_callback = fit_weights(dm, [callback])
    without = fit_weights(scenes(scenes_root), [])
    assert callback.num_logging_events == 2
    assert [k for k in without if not torch.equal(with_callback[k], without[k])] == []


def test_configuration_errors_name_the_argument():
    with pytest.raises(ValueError, match="method must be one of \\['pca', 'tsne'\\], got 'tnse'. Did you mean 'tsne'"):
        BoxEmbeddingCallback(method="tnse")
    with pytest.raises(ValueError, match="max_rows must be an int in \\[1, 10,000\\]"):
        BoxEmbeddingCallback(max_rows=20_000)
    with pytest.raises(ValueError, match="thumbnail_size"):
        BoxEmbeddingCallback(thumbnail_size=2)
    with pytest.raises(ValueError, match="iou_threshold"):
        BoxEmbeddingCallback(iou_threshold=0)
    with pytest.raises(ValueError, match="every_n_epochs and every_n_steps are both None"):
        BoxEmbeddingCallback(every_n_epochs=None)
    a, b = BoxEmbeddingCallback(), BoxEmbeddingCallback(log_key="embeddings_val")
    assert a.state_key != b.state_key


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from detlens.callbacks.embeddings import BoxEmbeddingCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import TorchvisionDetector

    if __name__ == "__main__":
        root, save_dir = sys.argv[1], sys.argv[2]
        dm = SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=64, batch_size=2, horizontal_flip=False)
        model = TorchvisionDetector(
            "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names,
            min_size=64, max_size=64, fpn_channels=16, representation_size=32, rpn_proposals_train=50,
            rpn_proposals_test=20, box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128],
            score_thresh=0.0, warmup_steps=1,
        )
        # 3 probe images over 2 ranks: rank 0 validates (and reads) images 0 and 2, rank 1 image 3
        # (unequal detection counts).
        callback = BoxEmbeddingCallback(score_threshold=0.0, max_detections=7, num_probe_images=3, thumbnail_size=16)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=WandbLogger(offline=True, save_dir=save_dir),
            callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, log_every_n_steps=1,
        )
        trainer.fit(model, dm)
        if trainer.is_global_zero:
            import wandb
            wandb.finish()
            print("probe indices", callback.probe_indices)
    """
)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_cpu_ddp_table_holds_the_detections_of_both_ranks(tmp_path):
    root = tmp_path / "scenes"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=64, batch_size=2)
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}

    done = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "logs")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "probe indices [0, 2, 3]" in done.stdout
    runs = find_offline_runs(tmp_path / "logs")
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])
    (table,) = logged_tables(run, "embeddings/table")
    per_image = {i: sum(r["probe_index"] == i for r in table["rows"]) for i in (0, 2, 3)}
    assert all(1 <= n <= 7 for n in per_image.values()), per_image
    assert scalar_history(run, "embeddings/detections") == [sum(per_image.values())]
    assert len(table["image_files"]) == len(table["rows"])


def test_an_event_with_nothing_to_project_says_why(scenes_root, tmp_path, caplog, wandb_data_dir):
    dm = scenes(scenes_root)
    callback = BoxEmbeddingCallback(method="pca", score_threshold=1.0, num_probe_images=2)  # no score exceeds 1.0
    pl.seed_everything(0)
    with caplog.at_level("INFO"):
        trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[callback]).fit(detector(dm), dm)
    wandb.finish()

    said = [r.getMessage() for r in caplog.records if "nothing to project" in r.getMessage()]
    assert len(said) == 1 and "score_threshold 1" in said[0] and "embeddings/detections is 0" in said[0]
    run = finished_run(find_offline_runs(tmp_path)[-1])
    assert [v for _, v in run.history_of("embeddings/detections")] == [0.0]
