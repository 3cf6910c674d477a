"""detlens.sinks.log_media and detlens.render.boxes: what each logger receives, and failures that stay warnings."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from wandb_utils import image_events, newest_offline_run

from detlens.render.boxes import draw_boxes, wandb_boxes
from detlens.sinks import Media, MediaImage, MediaTable, flush_media, log_media, log_media_later
from detlens.sinks import fanout
from detlens.sinks.wandb_payload import media_dir, wandb_table


def probe_image(step: int) -> MediaImage:
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[5:15, 4:12] = 255
    return MediaImage(
        pixels=pixels,
        caption=f"img 3 (id 11) · step {step}",
        gt_boxes=np.array([[4.0, 5.0, 12.0, 15.0]]),
        gt_labels=np.array([1]),
        pred_boxes=np.array([[3.0, 4.0, 13.0, 16.0], [20.0, -2.0, 40.0, 8.0]]),  # 2nd leaves the image
        pred_labels=np.array([1, 3]),
        pred_scores=np.array([0.9, 0.4]),
        class_names={1: "square", 2: "disc"},
    )


class BrokenLogger(Logger):
    """A logger whose every call fails, like a full disk or a dropped connection."""

    name = "broken"
    version = 0

    def log_metrics(self, metrics, step=None):
        raise OSError("disk full")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_wandb_gets_box_overlays_tables_and_scalars_and_csv_the_scalars(tmp_path, finish_wandb):
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    trainer = pl.Trainer(
        logger=[WandbLogger(offline=True, save_dir=tmp_path), csv_logger, BrokenLogger()],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    table = MediaTable(columns=["probe", "image", "score"], rows=[[3, probe_image(7), 0.9]])

    with pytest.warns(UserWarning, match="BrokenLogger failed to log media at step 7: OSError: disk full") as record:
        log_media(
            trainer,
            images={"predictions/probe": [probe_image(7)]},
            tables={"predictions/table": table},
            scalars={"predictions/mean_score": 0.65},
            step=7,
        )
    assert sum("BrokenLogger" in str(w.message) for w in record) == 1
    flush_media()  # the W&B payload is built on the media thread and logged from this one
    assert not fanout._pending
    csv_logger.save()
    wandb.finish()

    run = newest_offline_run(tmp_path)
    (event,) = image_events(run, "predictions/probe")
    assert event.captions == ["img 3 (id 11) · step 7"] and event.global_step == 7
    (pred,) = event.boxes(run, "predictions")
    assert [b["box_caption"] for b in pred["box_data"]] == ["square 0.90", "class 3 0.40"]
    assert pred["box_data"][1]["position"] == {"minX": 20.0, "minY": 0.0, "maxX": 30.0, "maxY": 8.0}
    assert pred["class_labels"] == {"1": "square", "2": "disc", "3": "class 3"}
    (gt,) = event.boxes(run, "ground_truth")
    assert gt["box_data"][0]["class_id"] == 1 and "scores" not in gt["box_data"][0]
    assert run.history_of("predictions/mean_score") == [(0, 0.65)]
    (table_ref,) = [v for _, v in run.history_of("predictions/table")]
    assert table_ref["_type"] == "table-file" and table_ref["ncols"] == 3
    with open(csv_logger.experiment.metrics_file_path) as f:
        assert [row["predictions/mean_score"] for row in csv.DictReader(f)] == ["0.65"]


class FailingWandbLogger(WandbLogger):
    def log_metrics(self, metrics, step=None):
        raise ConnectionError("wandb service process gone")


def test_wandb_media_are_logged_in_order_with_their_steps_and_the_queue_stays_bounded(tmp_path, finish_wandb):
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    for step in range(3 * fanout.MAX_PENDING):
        log_media(trainer, images={"predictions/probe": [probe_image(step)]}, scalars={"s": float(step)}, step=step)
        assert len({p.step for p in fanout._pending}) <= fanout.MAX_PENDING  # training waits rather than piling up media
    flush_media()
    assert not fanout._pending
    wandb.finish()

    run = newest_offline_run(tmp_path)
    steps = list(range(3 * fanout.MAX_PENDING))
    assert [e.global_step for e in image_events(run, "predictions/probe")] == steps
    assert [(row["trainer/global_step"], row["s"]) for row in run.history if "s" in row] == [(s, float(s)) for s in steps]


def test_logged_pngs_hold_the_exact_pixels_jpegs_close_ones_and_the_staged_files_are_removed(
    tmp_path, finish_wandb, monkeypatch
):
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    image = dataclasses.replace(probe_image(4), pixels=pixels)
    # an overlay-like picture (smooth colour ramps) as JPEG: colour kept at full resolution
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([xx * 4, yy * 5, 255 - xx * 2], axis=-1).astype(np.uint8)
    photo = dataclasses.replace(probe_image(5), pixels=smooth, file_type="jpg")
    table = MediaTable(columns=("thumb", "n"), rows=[[image, 1], [image, 2]])
    decoded = []
    load = PIL.ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(threading.current_thread().name)
        return load(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", counting_load)
    staged_before = set(Path(media_dir()).glob("*"))
    log_media(trainer, images={"p/probe": [image, image], "p/photo": [photo]}, tables={"p/table": table}, step=4)
    flush_media()
    monkeypatch.undo()
    wandb.finish()

    # wandb.Image and wandb.log of an image list learn the sizes from the pixels detlens
    # holds: no PNG is decoded again on the training thread, and on the media worker only
    # the table's two cells (plain wandb.Image, so W&B types the column as images)
    assert threading.main_thread().name not in decoded and len(decoded) == 2

    assert set(Path(media_dir()).glob("*")) <= staged_before  # moved into the run by wandb.log, or removed
    run = newest_offline_run(tmp_path)
    (event,) = image_events(run, "p/probe")
    for path in event.image_files(run):
        assert path.suffix == ".png"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels)  # lossless, RGB order kept
    (event,) = image_events(run, "p/photo")
    (path,) = event.image_files(run)
    assert path.suffix == ".jpg"
    error = np.abs(np.asarray(Image.open(path).convert("RGB")).astype(int) - smooth)  # RGB order kept, close
    assert error.mean() < 1.5 and error.max() <= 12, (error.mean(), error.max())
    (table_copy,) = [f for f in run.files if f.name.endswith(".table.json")]
    assert json.loads(table_copy.read_text())["data"] == [["Image", 1], ["Image", 2]]


def drop_a_stuck_build(trainer: pl.Trainer, monkeypatch: pytest.MonkeyPatch, media: Media, step: int) -> threading.Event:
    """Queues a build of ``media`` that blocks until the returned event is set, and has a
    stage-end flush drop it past a 0.5 s drain timeout (it goes on holding the media thread)."""
    monkeypatch.setattr(fanout, "DRAIN_TIMEOUT_S", 0.5)
    started, release = threading.Event(), threading.Event()

    def stuck() -> Media:
        started.set()
        release.wait(timeout=60)
        return media

    log_media_later(trainer, stuck, step=step)
    assert started.wait(timeout=30)
    with pytest.warns(UserWarning, match=f"the media of step {step} took over"):
        flush_media()
    return release


def test_a_build_dropped_past_the_drain_timeout_leaves_no_staged_pngs_once_it_finishes(tmp_path, finish_wandb,
                                                                                       monkeypatch):
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    staged_before = set(Path(media_dir()).glob("*.png"))
    release = drop_a_stuck_build(trainer, monkeypatch, Media({"slow": [probe_image(0), probe_image(1)]}, None, None), 3)
    release.set()
    fanout._worker().submit(lambda: None).result(timeout=30)  # the media thread has finished the dropped build
    log_media(trainer, scalars={"after": 1.0}, step=4)
    flush_media()
    wandb.finish()

    assert set(Path(media_dir()).glob("*.png")) <= staged_before
    assert not image_events(newest_offline_run(tmp_path), "slow")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_at_a_stage_end_queued_builds_are_built_beside_the_busy_media_thread_and_logged_in_order(
    tmp_path, finish_wandb
):
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    started, release = threading.Event(), threading.Event()
    ran: dict[int, tuple[str, int]] = {}

    def where() -> tuple[str, int]:
        return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def first() -> Media:
        ran[0] = where()
        started.set()
        release.wait(timeout=60)  # busy until the last queued build has run elsewhere
        return Media(None, None, {"v": 0.0})

    def queued(i: int) -> Media:
        ran[i] = where()
        if i == 2:
            release.set()
        return Media({"k": [probe_image(i)]}, None, {"v": float(i)})

    log_media_later(trainer, first, step=0)
    assert started.wait(timeout=30)
    log_media_later(trainer, functools.partial(queued, 1), step=1)
    log_media_later(trainer, functools.partial(queued, 2), step=2)
    flush_media()  # a stage end: everything, waiting
    wandb.finish()

    training_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert ran[0][0].startswith("detlens-media_")
    drain_thread = ran[1][0]
    assert drain_thread.startswith("detlens-media-drain") and ran[1] == ran[2] == (drain_thread, training_nice)
    run = newest_offline_run(tmp_path)
    assert [(row["trainer/global_step"], row["v"]) for row in run.history if "v" in row] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert [e.global_step for e in image_events(run, "k")] == [1, 2]


def test_media_queued_behind_a_build_stuck_past_the_drain_timeout_are_still_logged_at_the_stage_end(
    tmp_path, finish_wandb, monkeypatch
):
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    release = drop_a_stuck_build(trainer, monkeypatch, Media(None, None, {"stuck": 1.0}), 3)
    log_media(trainer, images={"after": [probe_image(4)]}, scalars={"after_s": 1.0}, step=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not dropped in turn
        flush_media()
    release.set()
    wandb.finish()

    run = newest_offline_run(tmp_path)
    assert [e.global_step for e in image_events(run, "after")] == [4]
    assert not [row for row in run.history if "stuck" in row]


def test_the_entries_of_one_logging_event_never_make_training_wait(tmp_path, finish_wandb):
    """Every callback logs at the same epoch end: the bound is on events, not on entries."""
    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    release = threading.Event()

    def slow_build(i: int) -> Media:
        release.wait(timeout=60)
        return Media(None, None, {f"cb{i}/value": float(i)})

    start = time.perf_counter()
    for i in range(3 * fanout.MAX_PENDING):  # more entries than MAX_PENDING, all at step 9
        log_media_later(trainer, functools.partial(slow_build, i), step=9)
    waited = time.perf_counter() - start
    release.set()
    flush_media()
    wandb.finish()

    assert waited < 10  # nothing waited for the blocked builds (each would wait up to 60 s)
    run = newest_offline_run(tmp_path)
    logged = {k: (row["trainer/global_step"], v) for row in run.history for k, v in row.items() if k.startswith("cb")}
    assert logged == {f"cb{i}/value": (9, float(i)) for i in range(3 * fanout.MAX_PENDING)}


def test_a_wandb_logger_failing_at_flush_time_costs_a_warning(tmp_path, finish_wandb):
    trainer = pl.Trainer(logger=FailingWandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    log_media(trainer, images={"k": [probe_image(0)]}, scalars={"s": 1.0}, step=5)
    with pytest.warns(UserWarning, match="WandbLogger failed to log media at step 5: ConnectionError: wandb service"):
        flush_media()
    assert not fanout._pending


def test_media_built_later_are_built_off_the_training_thread_and_followed_up_on_it(tmp_path, finish_wandb):
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    trainer = pl.Trainer(logger=[WandbLogger(offline=True, save_dir=tmp_path), csv_logger], accelerator="cpu",
                         enable_progress_bar=False)
    threads: dict[str, threading.Thread] = {}

    def build() -> Media:
        threads["build"] = threading.current_thread()
        return Media(images={"plot": [probe_image(3)]}, scalars={"score": 0.5}, extra="record me")

    def then(media: Media) -> None:
        threads["then"] = threading.current_thread()
        assert media.extra == "record me"

    def broken() -> Media:
        raise ValueError("t-SNE diverged")

    with pytest.warns(UserWarning, match="building the media of step 4 failed: ValueError: t-SNE diverged"):
        log_media_later(trainer, build, step=3, then=then)
        log_media_later(trainer, broken, step=4)
        flush_media()
    assert not fanout._pending
    assert threads["build"] is not threading.main_thread() and threads["then"] is threading.main_thread()
    csv_logger.save()
    wandb.finish()
    run = newest_offline_run(tmp_path)
    assert [e.global_step for e in image_events(run, "plot")] == [3]
    assert [(row["trainer/global_step"], row["score"]) for row in run.history if "score" in row] == [(3, 0.5)]
    with open(csv_logger.experiment.metrics_file_path) as f:  # the other loggers get it at flush time too
        assert [row["score"] for row in csv.DictReader(f)] == ["0.5"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_the_media_thread_yields_the_cores_to_training_and_leaves_training_priority_alone(tmp_path, finish_wandb):
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    built = threading.Event()

    def build() -> Media:
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        built.set()
        return Media(scalars={"s": 1.0})

    trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                         enable_progress_bar=False)
    log_media_later(trainer, build, step=0)
    # Built while training goes on (a stage-end flush would hand a build not yet started
    # to the drain thread, which keeps training's priority).
    assert built.wait(timeout=30)
    flush_media()
    wandb.finish()
    assert fanout.MEDIA_THREAD_NICENESS > 0
    assert seen["nice"] == min(19, main_nice + fanout.MEDIA_THREAD_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice  # training's own is unchanged


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in /proc")
def test_the_media_and_drain_threads_run_torch_ops_on_one_thread_and_open_no_openmp_team(monkeypatch):
    # A second OpenMP team in the process (its workers live as long as the media thread) made
    # libgomp throttle the spin-wait of training's own team for the rest of the run.
    def threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def parallel_ops() -> int:
        x = torch.ones(1 << 20)  # elementwise ops on more than 32,768 values run as an OpenMP region
        for _ in range(3):
            x = x * 1.5
        return torch.get_num_threads()

    # Fresh media and drain threads, started while training uses two intra-op threads (other
    # test modules set one at import; a new thread takes torch's count at its first op).
    monkeypatch.setattr(fanout, "_executor", None)
    monkeypatch.setattr(fanout, "_drain_executor", None)
    training_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel_ops()  # the training thread's own team exists
        for worker in (fanout._worker(), fanout._drain()):
            worker.submit(lambda: None).result(timeout=60)  # started
            before = threads()
            assert worker.submit(parallel_ops).result(timeout=60) == 1
            assert threads() <= before  # no OpenMP workers started for it
        assert torch.get_num_threads() == 2  # training's own count is unchanged
    finally:
        torch.set_num_threads(training_threads)


def test_media_built_later_without_wandb_are_built_at_once():
    trainer = pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    seen = []
    log_media_later(trainer, lambda: Media(scalars={"s": 1.0}, extra=7), step=0, then=lambda m: seen.append(m.extra))
    assert seen == [7] and not fanout._pending


def test_no_loggers_is_a_no_op():
    trainer = pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_media(trainer, images={"k": [probe_image(0)]}, scalars={"s": 1.0}, step=0)


def test_tensorboard_gets_the_boxes_drawn_into_the_image(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoardLogger needs tensorboard installed")
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    log_media(trainer, images={"predictions/probe": [probe_image(2)]}, scalars={"predictions/mean_score": 0.5}, step=2)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "predictions/probe/0" in events.Tags()["images"]
    assert events.Scalars("predictions/mean_score")[0].value == 0.5


def test_media_image_rejects_inconsistent_input():
    with pytest.raises(ValueError, match=r"uint8\[H, W, 3\]"):
        MediaImage(pixels=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="one label per box"):
        MediaImage(pixels=np.zeros((8, 8, 3), np.uint8), pred_boxes=np.zeros((2, 4)), pred_labels=np.array([1]))
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        MediaTable(columns=["a", "b"], rows=[[1, 2, 3]])


def _thumbnail(value: int, boxes: bool = False) -> wandb.Image:
    pixels = np.full((8, 8, 3), value, np.uint8)
    if not boxes:
        return wandb.Image(pixels, caption=f"v{value}")
    box = {"position": {"minX": 1, "minY": 1, "maxX": 5, "maxY": 5}, "class_id": value % 3, "domain": "pixel"}
    return wandb.Image(pixels, boxes={"predictions": {"box_data": [box], "class_labels": {0: "a", 1: "b", 2: "c"}}})


def test_tables_get_the_column_types_wandb_infers_itself_when_rows_are_typed_once_per_run_of_alike_rows():
    # The embedding table's rows (a long float list per row, a thumbnail image) and rows that
    # change type mid-table: list lengths back and forth, None, ints then floats, images
    # with and without boxes, numpy values. wandb_table types a row only when
    # it is typed unlike the row before it; the column types and data must be wandb's own.
    rng = np.random.default_rng(0)
    columns = ["class", "score", "box", "thumbnail", "embedding", "extra"]
    embedding_rows = [["cat", float(s), [1.0, 2.0, 3.0, 4.0], _thumbnail(i), rng.normal(size=64).tolist(), i]
                      for i, s in enumerate(rng.random(40))]
    mixed_rows = [
        ["cat", 0.5, [1.0, 2.0, 3.0, 4.0], _thumbnail(1), [0.1] * 8, 1],
        ["dog", 0.7, [1.0, 2.0, 3.0, 4.0, 5.0], _thumbnail(2), [0.1] * 8, None],
        ["dog", 0.7, [1.0, 2.0, 3.0, 4.0, 5.0], _thumbnail(3), [0.2] * 8, None],
        ["cat", 1, [1, 2, 3, 4], _thumbnail(4, boxes=True), [0.3] * 8, 2.5],
        ["cat", None, [1.0, 2.0, 3.0, 4.0], _thumbnail(5, boxes=True), [1, 2.5] * 4, np.float32(3.0)],
        ["cat", 0.1, [], None, np.zeros(8, np.float32), 3],
        ["cat", 0.2, [1.0, 2.0, 3.0, 4.0], _thumbnail(6), [0.4] * 8, 7],
        ["cat", 0.3, [1.0, 2.0, 3.0, 4.0], _thumbnail(7), [0.5] * 8, 7],
        ["cat", 0.3, [1.0, 2.0, 3.0, 4.0, 5.0], _thumbnail(8), [0.5] * 8, 7],
    ]
    nan_first = [["cat", float("nan"), [1.0], None, [0.5], 1], ["cat", 0.5, [1.0], None, [0.5], 2]]
    typed = []  # the rows wandb_table has wandb type
    table_class = type(wandb_table(columns, embedding_rows[:1]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(table_class, "add_data", lambda self, *row: typed.append(row) or wandb.Table.add_data(self, *row))
        for rows in (embedding_rows, mixed_rows, mixed_rows[::-1], nan_first):
            typed.clear()
            ours, theirs = wandb_table(columns, rows), wandb.Table(columns=columns, data=rows)
            assert ours._column_types.to_json() == theirs._column_types.to_json()
            assert ours.columns == theirs.columns and ours.data == theirs.data
            if rows is embedding_rows:
                assert len(typed) == 1  # 40 alike rows (thumbnails included) typed once
    # A wandb whose type registry has moved: wandb's own table.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb.sdk.data_types._dtypes", None)
        fallback = wandb_table(columns, embedding_rows)
    assert type(fallback) is wandb.Table and fallback.data == embedding_rows
    # Rows wandb refuses are refused the same way.
    with pytest.raises(ValueError, match="expects 2 columns"):
        wandb_table(["a", "b"], [[1, 2], [1, 2, 3]])
    with pytest.raises(TypeError, match="incompatible types"):
        wandb_table(["a", "b"], [[1, [1.0, 2.0]], [2, [1.0, 2.0]], [3, "not a list"]])
    with pytest.raises(TypeError, match="incompatible types"):
        wandb_table(["a", "b"], [[1, [1.0, 2.0]], [2, [1.0, 2.0]], [3, [1.0, float("nan")]]])


def test_a_logged_table_has_the_json_wandb_writes_itself_with_nan_images_and_numpy_cells(tmp_path, finish_wandb):
    # The cells that already are JSON skip wandb's per-value conversion when the table is
    # logged; NaN (null in W&B's JSON), images (added to the table's artifact) and numpy
    # values still go through it (a NaN inside a list of numbers wandb refuses to type, and so
    # does wandb_table). Compared with wandb's own Table.to_json for the run's
    # table artifact, on two artifacts holding the same images, and with the run's own copy
    # of the table that wandb.log writes.
    nan, inf = float("nan"), float("inf")

    def rows() -> list[list]:
        return [
            ["a", 1, 0.5, [0.1, 0.2, 0.3], _thumbnail(1), np.float32(2.5), ["x", "y"], True],
            ["b", 2, nan, [0.1, 0.2, 0.3], _thumbnail(2), np.float32(3.5), ["z"], False],
            ["c", None, inf, [1.0, 2.0, -inf], _thumbnail(3), np.float32(nan), [], True],
            ["d", 4, 2.0, (4.0, 5.0, 6.0), _thumbnail(4, boxes=True), np.float32(1.0), ["w"], None],
        ]

    columns = ["name", "count", "score", "vector", "image", "value", "tags", "flag"]
    ours = wandb_table(columns, rows())
    assert type(ours).__name__ == "_JsonReadyTable" and all(ours._json_cells)  # the fast path is taken
    data_before = [list(r) for r in ours.data]
    ours_json = ours.to_json(wandb.Artifact("ours", "run_table"))
    theirs_json = wandb.Table(columns=columns, data=rows()).to_json(wandb.Artifact("theirs", "run_table"))
    assert json.dumps(ours_json, sort_keys=True) == json.dumps(theirs_json, sort_keys=True)
    assert ours_json["data"][1][2] is None  # NaN -> null, as wandb does
    assert [len(r) for r in ours.data] == [len(r) for r in data_before]
    assert all(a is b for r, r0 in zip(ours.data, data_before) for a, b in zip(r, r0))  # its rows are left as they were

    run = wandb.init(mode="offline", dir=str(tmp_path), project="tables")
    run.log({"ours": wandb_table(columns, rows()), "theirs": wandb.Table(columns=columns, data=rows())})
    wandb.finish()
    copies = {f.name.split("_")[0]: json.loads(f.read_text()) for f in newest_offline_run(tmp_path).files
              if f.name.endswith(".table.json")}
    assert set(copies) == {"ours", "theirs"} and copies["ours"] == copies["theirs"]
    assert copies["ours"]["data"][0][3] == [0.1, 0.2, 0.3] and copies["ours"]["data"][3][3] == [4.0, 5.0, 6.0]


def test_wandb_box_groups_are_empty_not_missing_when_nothing_was_detected():
    groups = wandb_boxes((10, 10), gt_boxes=np.array([[1, 1, 5, 5]]), gt_labels=[2], pred_boxes=np.zeros((0, 4)),
                         pred_labels=[], pred_scores=[], class_names={2: "disc"})
    assert groups["predictions"] == {"box_data": [], "class_labels": {2: "disc"}}
    assert groups["ground_truth"]["box_data"][0]["box_caption"] == "disc"


def test_drawn_boxes_outline_the_object_and_caption_it_above():
    pixels = np.zeros((32, 32, 3), np.uint8)
    drawn = draw_boxes(pixels, [[8, 12, 24, 28]], [1], scores=[0.5], class_names={1: "a"})
    assert pixels.sum() == 0, "the input was modified"
    assert drawn[12, 10:22].any(axis=1).all() and drawn[14:26, 8].any(axis=1).all(), "outline drawn"
    assert not drawn[15:25, 11:21].any(), "the inside of the box stays visible"
    assert drawn[:11].any(), "caption above the box"


STUCK_AT_EXIT = """
import time
from detlens.sinks import fanout
fanout._worker().submit(time.sleep, 3600)  # a media build that never ends, on the media thread
fanout._drain().submit(time.sleep, 3600)  # and one on the drain thread
time.sleep(0.2)
print("leaving")
"""


def test_a_media_build_that_never_ends_does_not_keep_the_training_process_from_exiting():
    # Dropped after DRAIN_TIMEOUT_S, a stuck build still runs on its thread; threads of
    # concurrent.futures' executors are joined at interpreter exit, the media threads are not.
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "leaving", done.stderr[-2000:]
    assert time.monotonic() - start < 60
