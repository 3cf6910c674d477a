"""Reading an offline W&B run back from disk: what was logged is what the reader returns."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import wandb

from wandb_offline import OfflineRunError, find_offline_runs, read_offline_run, read_records
from wandb_utils import finished_run


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A real offline run: scalars, a nested value, a >32 KiB row, an image with boxes, config, summary."""
    root = tmp_path_factory.mktemp("wandb")
    run = wandb.init(mode="offline", dir=str(root), project="detlens-tests", config={"lr": 0.01, "arch": {"depth": 18}})
    for step in range(3):
        run.log({"train/loss": 1.0 / (step + 1), "epoch": step // 2, "note": f"row {step}"})
    run.log({"long_text": "x" * 100_000})  # spans several 32 KiB blocks: FIRST/MIDDLE/LAST chunks
    image = wandb.Image(
        np.full((12, 16, 3), 200, np.uint8),
        caption="img 0 (id 7) · step 3",
        boxes={
            "predictions": {
                "box_data": [
                    {
                        "position": {"minX": 1.0, "minY": 2.0, "maxX": 9.0, "maxY": 10.0},
                        "domain": "pixel",
                        "class_id": 2,
                        "box_caption": "square 0.91",
                        "scores": {"score": 0.91},
                    }
                ],
                "class_labels": {2: "square"},
            }
        },
    )
    run.log({"predictions/probe": [image]})
    run.summary["best/mAP"] = 0.5
    run.finish()
    (run_dir,) = find_offline_runs(root)
    finished_run(run_dir)  # W&B's writer may still be flushing when finish() returns
    return run_dir


def test_history_config_summary_and_media_come_back_as_logged(offline_run):
    run = read_offline_run(offline_run)

    assert run.run_id and run.project == "detlens-tests" and run.exit_code == 0
    assert not run.truncated and run.skipped_chunks == 0
    assert run.config == {"lr": 0.01, "arch": {"depth": 18}}
    assert run.history_of("train/loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [v for _, v in run.history_of("note")] == ["row 0", "row 1", "row 2"]
    assert run.history_of("long_text") == [(3, "x" * 100_000)]
    assert run.summary["best/mAP"] == 0.5 and run.summary["train/loss"] == pytest.approx(1 / 3)

    (images,) = [v for _, v in run.history_of("predictions/probe")]
    assert images["_type"] == "images/separated" and images["captions"] == ["img 0 (id 7) · step 3"]
    assert (images["width"], images["height"]) == (16, 12)
    names = {p.relative_to(run.run_dir / "files").as_posix() for p in run.files}
    assert set(images["filenames"]) <= names
    box_file = images["all_boxes"][0]["predictions"]["path"]
    assert box_file in names
    (box,) = json.loads((run.run_dir / "files" / box_file).read_text())["box_data"]
    assert box["scores"] == {"score": 0.91} and box["position"]["maxY"] == 10.0


def test_a_run_killed_mid_write_yields_every_record_before_the_cut(offline_run, tmp_path):
    full = read_offline_run(offline_run)
    (log_file,) = offline_run.glob("run-*.wandb")
    data = log_file.read_bytes()
    cut_dir = tmp_path / offline_run.name
    shutil.copytree(offline_run, cut_dir)
    (cut_file,) = cut_dir.glob("run-*.wandb")
    long_row_at = data.index(b"x" * 1000)  # cut inside the multi-block record

    for cut in (long_row_at + 40_000, long_row_at + 5, len(data) - 3):
        cut_file.write_bytes(data[:cut])
        run = read_offline_run(cut_dir)
        assert run.truncated and run.exit_code is None
        assert run.config["lr"] == 0.01
        assert [s for s, _ in run.history_of("train/loss")] == [0, 1, 2]
        assert run.history == full.history[: len(run.history)]


def test_a_corrupted_chunk_is_skipped_and_reading_resumes(offline_run, tmp_path):
    (log_file,) = offline_run.glob("run-*.wandb")
    data = bytearray(log_file.read_bytes())
    data[data.index(b"row 1") + 1] ^= 0xFF  # flips a byte: that chunk's CRC no longer matches
    bad = tmp_path / log_file.name
    bad.write_bytes(bytes(data))

    payloads, truncated, skipped = read_records(bad)
    good, _, _ = read_records(log_file)
    assert skipped >= 1 and not truncated and 0 < len(payloads) < len(good)


def test_files_that_are_not_wandb_logs_are_refused_clearly(tmp_path):
    (tmp_path / "run-abc.wandb").write_bytes(b"PK\x03\x04 not a wandb log")
    with pytest.raises(OfflineRunError, match="not a W&B log"):
        read_offline_run(tmp_path)
    with pytest.raises(OfflineRunError, match="expected one run-"):
        read_offline_run(tmp_path / "missing")
