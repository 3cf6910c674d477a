"""detlens' media process: W&B media built in a separate process, and what happens when that goes wrong."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import types

from concurrent.futures import Future

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import image_events, newest_offline_run

from detlens.sinks import Media, MediaImage, flush_media, log_media_later
from detlens.sinks import fanout, media_process


def where_built(step: int) -> Media:
    """A media job that says where it ran (module level: it pickles by reference)."""
    pixels = np.full((12, 16, 3), 200, np.uint8)
    niceness = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None
    return Media(
        images={"where": [MediaImage(pixels, caption=f"step {step}")]},
        scalars={"s": float(step)},
        extra={"pid": os.getpid(), "nice": niceness, "thread": threading.current_thread().name},
    )


def diverges(_: int) -> Media:
    raise ValueError("t-SNE diverged")


def sleeps(seconds: float) -> Media:
    time.sleep(seconds)  # a stuck job
    return Media(scalars={"s": 1.0})


def signals_and_sleeps(path: str, seconds: float) -> Media:
    open(path, "w").close()  # noqa: SIM115 - tells the test the worker has started it
    return sleeps(seconds)


def dies(_: int) -> Media:
    os._exit(3)  # the media process killed mid-job (out of memory, a signal)


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(fanout, "MEDIA_PROCESS", "on")  # "auto" would pick the thread for a CPU trainer
    return pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu", enable_progress_bar=False)


def test_auto_builds_in_the_process_next_to_accelerator_training_and_on_the_thread_next_to_cpu_training(
    tmp_path, monkeypatch, finish_wandb
):
    monkeypatch.setattr(fanout, "MEDIA_PROCESS", "auto")
    gpu_trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert fanout._use_process(gpu_trainer)  # its cores are free: no GIL shared with the training thread
    cpu_trainer = pl.Trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), accelerator="cpu",
                             enable_progress_bar=False)
    seen: list[dict] = []
    log_media_later(cpu_trainer, functools.partial(where_built, 1), step=1, then=lambda m: seen.append(m.extra))
    flush_media()
    assert seen[0]["pid"] == os.getpid() and seen[0]["thread"].startswith("detlens-media")
    monkeypatch.setattr(fanout, "MEDIA_PROCESS", "off")
    assert not fanout._use_process(gpu_trainer)


def test_picklable_jobs_are_built_in_a_lower_priority_process_and_logged_from_the_training_thread(tmp_path, trainer, finish_wandb):
    seen: list[dict] = []
    for step in (3, 5):
        log_media_later(trainer, functools.partial(where_built, step), step=step, then=lambda m: seen.append(m.extra))
    flush_media(limit=2)  # waits as training does mid-stage (a stage end also builds in this process, below)
    wandb.finish()

    assert not fanout._pending and len(seen) == 2
    assert {s["pid"] for s in seen} != {os.getpid()} and len({s["pid"] for s in seen}) == 1  # one worker, not us
    if hasattr(os, "getpriority"):
        assert seen[0]["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + fanout.MEDIA_THREAD_NICENESS)
    run = newest_offline_run(tmp_path)
    assert [e.global_step for e in image_events(run, "where")] == [3, 5]
    assert [(row["trainer/global_step"], row["s"]) for row in run.history if "s" in row] == [(3, 3.0), (5, 5.0)]


def test_at_a_stage_end_the_jobs_the_process_has_not_started_are_built_here_beside_it(tmp_path, trainer, finish_wandb):
    seen: dict[int, dict] = {}

    def keep(step: int):
        return lambda media: seen.__setitem__(step, media.extra)

    started = tmp_path / "started"
    log_media_later(trainer, functools.partial(signals_and_sleeps, str(started), 3.0), step=1)
    for step in (2, 3, 4):
        log_media_later(trainer, functools.partial(where_built, step), step=step, then=keep(step))
    deadline = time.monotonic() + 120  # the worker's start-up
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fanout._process.has_unsent()  # one job at a time goes to the worker; the rest wait here
    flush_media()  # the stage end: training waits for all of them
    wandb.finish()

    assert not fanout._pending and not fanout._process.has_unsent()
    for step in (2, 3, 4):  # built beside the busy worker, at training's priority, not the worker's
        assert seen[step]["pid"] == os.getpid() and seen[step]["thread"].startswith("detlens-media-drain")
        if hasattr(os, "getpriority"):
            assert seen[step]["nice"] == os.getpriority(os.PRIO_PROCESS, 0)
    run = newest_offline_run(tmp_path)
    assert [e.global_step for e in image_events(run, "where")] == [2, 3, 4]  # logged oldest first all the same


def test_take_unsent_hands_back_the_oldest_job_not_sent_and_the_worker_never_runs_it(tmp_path):
    worker = media_process.MediaProcess(niceness=0)
    started = tmp_path / "started"
    try:
        first = worker.submit(functools.partial(signals_and_sleeps, str(started)), 1.0)
        deadline = time.monotonic() + 120  # the worker's start-up
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = worker.submit(where_built, 2)
        third = worker.submit(where_built, 3)
        fn, arg, future = worker.take_unsent()
        assert future is second and fn is where_built and arg == 2  # unpickled: what the worker would have run
        future.set_result("built by the caller")
        assert first.result(timeout=120).scalars == {"s": 1.0}
        assert third.result(timeout=120).extra["pid"] == worker.pid != os.getpid()
        assert second.result() == "built by the caller" and worker.take_unsent() is None and not worker.has_unsent()
    finally:
        worker.close()


def test_a_job_the_process_cannot_import_is_built_on_the_media_thread_instead(tmp_path, trainer, finish_wandb):
    # A function of a module that exists only in this process (as a user's __main__ would be).
    ghost = types.ModuleType("detlens_test_ghost_module")
    exec("from test_sinks_media_process import where_built as build", ghost.__dict__)  # noqa: S102
    exec("def ghost_build(step):\n    return build(step)\n", ghost.__dict__)  # noqa: S102
    sys.modules[ghost.__name__] = ghost
    seen: list[dict] = []
    try:
        log_media_later(trainer, functools.partial(ghost.ghost_build, 7), step=7, then=lambda m: seen.append(m.extra))
        flush_media()
    finally:
        del sys.modules[ghost.__name__]
    wandb.finish()
    assert seen[0]["pid"] == os.getpid() and seen[0]["thread"].startswith("detlens-media")
    assert [e.global_step for e in image_events(newest_offline_run(tmp_path), "where")] == [7]


def test_a_failing_job_and_a_dying_process_cost_a_warning_and_the_jobs_behind_them_are_logged(tmp_path, trainer, finish_wandb):
    pids: dict[int, int] = {}

    def keep(step: int):
        return lambda media: pids.__setitem__(step, media.extra["pid"])

    with pytest.warns(UserWarning) as record:
        log_media_later(trainer, functools.partial(where_built, 0), step=0, then=keep(0))
        log_media_later(trainer, functools.partial(diverges, 0), step=1)
        log_media_later(trainer, functools.partial(dies, 0), step=2)
        log_media_later(trainer, functools.partial(where_built, 3), step=3, then=keep(3))
        flush_media(limit=4)  # mid-stage: a stage end could build the later jobs in this process, and die of one
    messages = [str(w.message) for w in record]
    assert any("step 1 failed" in m and "ValueError: t-SNE diverged" in m for m in messages)
    assert any("step 2 failed" in m and "media process exited (code 3)" in m for m in messages)
    assert not any("step 3" in m for m in messages)
    assert pids[3] not in (pids[0], os.getpid())  # not sent to the worker that died: a new worker built it

    log_media_later(trainer, functools.partial(where_built, 4), step=4, then=keep(4))  # which goes on
    flush_media(limit=1)  # mid-stage again: at a stage end the drain thread may build it here instead
    wandb.finish()
    assert pids[4] == pids[3] and not fanout._pending
    assert [e.global_step for e in image_events(newest_offline_run(tmp_path), "where")] == [0, 3, 4]


def test_a_worker_that_cannot_start_hands_its_jobs_back_and_is_not_restarted(monkeypatch):
    monkeypatch.setattr(media_process, "_WORKER_CODE", "import sys; sys.exit(4)")  # cannot import detlens, say
    worker = media_process.MediaProcess()
    done: Future = Future()
    done.set_result("built here instead")
    try:
        assert worker.submit(where_built, 0, fallback=lambda: done).result(timeout=60) == "built here instead"
        with pytest.raises(OSError, match="exited with code 4 before answering any job"):
            worker.submit(where_built, 0)
        assert worker.starts == 1
    finally:
        worker.close()


def test_a_job_past_the_drain_timeout_is_dropped_and_the_stuck_worker_replaced(tmp_path, trainer, monkeypatch, finish_wandb):
    monkeypatch.setattr(fanout, "DRAIN_TIMEOUT_S", 1.0)
    started = tmp_path / "started"
    with pytest.warns(UserWarning) as record:
        log_media_later(trainer, functools.partial(signals_and_sleeps, str(started), 600.0), step=1)
        log_media_later(trainer, functools.partial(where_built, 2), step=2)  # queued behind it
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:  # in the worker, not the drain thread
            time.sleep(0.05)
        flush_media()
    messages = [str(w.message) for w in record]
    assert any("media of step 1 took over 1 s to build; dropped" in m for m in messages)
    assert not any("step 2" in m for m in messages)  # queued behind it: built on the drain thread meanwhile, logged
    assert not fanout._pending

    monkeypatch.setattr(fanout, "DRAIN_TIMEOUT_S", 120.0)  # a new worker's start-up takes seconds
    log_media_later(trainer, functools.partial(where_built, 3), step=3)
    flush_media()
    wandb.finish()
    assert [e.global_step for e in image_events(newest_offline_run(tmp_path), "where")] == [2, 3]
