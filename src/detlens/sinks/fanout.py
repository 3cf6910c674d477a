"""``log_media``: one call hands images, tables and scalars to every logger of a Trainer.

Rank 0 only (``log_results`` runs there); it runs no collectives. A logger that fails
costs one warning and never an exception into training.

W&B media are built off the training thread (docs/DESIGN.md rule 4): drawing overlays and
plots, a t-SNE, encoding an image file per ``wandb.Image``: seconds per logging event, time a GPU
would otherwise sit idle. They are built in order, either by detlens' media process
(:mod:`detlens.sinks.media_process`: a separate Python process with its own GIL) or by a
media thread of this process, both at a lower priority; :data:`MEDIA_PROCESS` says which
(by default the process next to accelerator training, the thread next to CPU training; a
job that cannot be pickled, a closure, always goes to the thread). The ``log`` calls
themselves stay on the training thread (``wandb.log`` is not thread-safe,
wandb/wandb#1824): finished payloads are logged at the next ``log_media`` or
:func:`flush_media` call, which every detlens callback makes after each training batch,
and all of them at the end of a stage or on an exception (then the builds the media
worker has not started move to a drain thread at training's priority, built beside the
one it is busy with). Rows keep the step they were
made at (``trainer/global_step``), so a later ``log`` call changes nothing on the
dashboard. The queued media of at most :data:`MAX_PENDING` logging events (distinct
steps) wait; a queued entry of one more event blocks until the oldest entry is logged, so
memory stays bounded. :func:`log_media_later` moves more off the training
thread: a callback hands it a function that turns explanations into media (a t-SNE
projection, matplotlib plots, overlays) -- picklable, a ``functools.partial`` of a
module-level function (:mod:`detlens.render.media_jobs`), so that the process can run it --
and a follow-up that runs back on the training thread once they are logged.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from detlens.render.boxes import draw_boxes
from detlens.render.media import Media, MediaImage, MediaTable
from detlens.sinks.media_process import MediaProcess
from detlens.sinks.wandb_payload import build_payload, given, media_dir, remove_files

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["MAX_PENDING", "MEDIA_THREAD_NICENESS", "Media", "flush_media", "log_media", "log_media_later"]

MAX_PENDING = 4
"""Logging events (distinct steps) whose W&B payloads may be waiting to be logged before
``log_media`` blocks; one event holds one entry per callback that logged at that step."""

MEDIA_THREAD_NICENESS = 10
"""How much lower than the training thread detlens' media process (and media thread) is
scheduled: a ``nice`` increment (0-19; 0 leaves it alone). The process lowers its own
priority (Unix); the thread lowers that thread's alone (Linux; elsewhere nothing is
changed). Set before the first logging event (the worker is started then).

Media work is best-effort: when training waits for media (the queue is full, or a stage
ends) its threads sleep and the media worker gets the cores. Not 19: on a node shared
with other jobs a nice-19 worker gets ~1.5% of a core, which can push a payload past
:data:`DRAIN_TIMEOUT_S`; nice 10 gets ~10%. On a thread, priority alone does not stop the
GIL contention (``benchmarks/media_thread_contention.py``: +11-38% per training step at
nice 10); see :data:`MEDIA_PROCESS`."""

MEDIA_PROCESS: str = os.environ.get("DETLENS_MEDIA_PROCESS", "auto").strip().lower()
"""Where picklable media jobs are built: ``"on"`` in detlens' media process
(:mod:`detlens.sinks.media_process`), ``"off"`` on the media thread, ``"auto"`` (the
default) in the process when the model trains on an accelerator and on the thread when it
trains on the CPU. Read from ``DETLENS_MEDIA_PROCESS`` (also ``1``/``0``).

Why: the process has its own GIL, so it does not slow the training steps next to it, but
it costs a start-up (importing torch, matplotlib, OpenCV and wandb: ~6 CPU seconds, once)
and about 0.5 GB of private memory. Next to training that leaves a core free (a GPU node),
a busy media thread slowed the demo's steps by 26% and the process by 1%; when training
already uses every core (CPU training) the process competes for the cores instead and its
start-up is paid out of training's time, and whole demo fits were not faster with it
(``benchmarks/media_thread_contention.py``, ``benchmarks/callback_overhead.py``). A job
that does not pickle (a closure) is built on the thread either way."""

DRAIN_TIMEOUT_S = 120.0
"""How long the end of a stage waits for one payload before giving up on it with a warning."""


@dataclass
class _Pending:
    wandb_loggers: list[WandbLogger]
    other_loggers: list[Logger]  # fed at flush time (log_media_later only; log_media feeds them at once)
    result: Future  # Future[tuple[Media, dict[str, Any]]]
    step: int
    then: Callable[[Media], None] | None
    build: Callable[[], Media] | None = None  # a media-thread job's build: moved at a stage end if not started


class _DaemonWorker:
    """One daemon thread that runs the calls submitted to it in order, each into a ``Future``.

    Not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its threads at exit,
    so a media build that hangs (dropped after :data:`DRAIN_TIMEOUT_S`, but still running)
    would keep the training process from exiting. Seen in CI: a stuck job the drain thread
    had taken held the test process for ten minutes after the last test.
    """

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._initializer = initializer
        # named as ThreadPoolExecutor names its threads (profiles and logs read the same)
        threading.Thread(target=self._run, name=f"{name}_0", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def _run(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:  # noqa: BLE001 - the thread left as it was set up so far; the jobs still run
                pass
        while True:
            future, fn, args = self._calls.get()
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                future.set_exception(exc)


_pending: deque[_Pending] = deque()
_lock = threading.Lock()  # guards _pending (callbacks of two Trainers may share a thread)
_executor: _DaemonWorker | None = None
_executor_lock = threading.Lock()
_drain_executor: _DaemonWorker | None = None
_process: MediaProcess | None = None
_process_broken = False
_build_seconds = 0.0
_build_cpu_seconds = 0.0
_seconds_lock = threading.Lock()


def _worker() -> _DaemonWorker:
    global _executor
    with _executor_lock:  # also called from the media process's reader thread (a job sent back)
        if _executor is None:
            _executor = _DaemonWorker("detlens-media", initializer=_set_up_media_thread)
        return _executor


def _set_up_media_thread() -> None:
    """Runs first on the media thread: a lower priority, one OpenMP thread."""
    _lower_priority()
    _one_openmp_thread()


def _lower_priority() -> None:
    """The calling thread's ``nice`` value goes up by :data:`MEDIA_THREAD_NICENESS`.

    Linux only: there the nice value is a per-thread attribute and ``setpriority`` with a
    thread id changes that thread alone (setpriority(2), NOTES); threads it starts later
    inherit it. Elsewhere a thread id is not a process id, so nothing is done. Lowering
    one's own priority needs no privilege; a failure leaves the priority as it was.
    """
    if MEDIA_THREAD_NICENESS <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + int(MEDIA_THREAD_NICENESS)))
    except OSError:
        pass


def _one_openmp_thread() -> None:
    """The calling thread's OpenMP parallel regions (torch's intra-op ones included) run on
    this thread alone, for as long as it lives.

    Runs first on the media and drain threads. Their torch ops are small (detaching and
    converting maps, scaling them to bytes), but elementwise ops over more than 32,768
    values run as an OpenMP parallel region. GNU libgomp (PyTorch's OpenMP on Linux) gives
    every thread that opens one a team of its own, as large as torch's intra-op thread
    count, and keeps that team's workers as long as the thread lives. Once the process
    has more OpenMP threads than CPUs, libgomp throttles the spin-wait of every team
    (``OMP_WAIT_POLICY`` unset: 300,000 spins down to 100), so from the first logging event on,
    the training thread slept and was woken at the barriers of its own parallel regions for
    the rest of the run. In the demo on 2 CPU cores: ~850 voluntary context switches per
    training step instead of ~15, and the second epoch's steps 4-16% slower than the
    first's (``benchmarks/callback_overhead.py``). One thread opens no team.

    ``torch.get_num_threads()`` first: torch sets each thread's OpenMP thread count the
    first time the thread asks for it (``at::internal::lazy_init_num_threads``), which
    would undo a count set before. threadpoolctl calls each loaded OpenMP runtime's
    ``omp_set_num_threads``, which sets the calling thread's count only (OpenMP's
    ``nthreads-var`` is per thread); BLAS pools, which are per process, are not touched.
    A failure leaves the count as it was.
    """
    try:
        import torch
        from threadpoolctl import ThreadpoolController

        torch.get_num_threads()
        ThreadpoolController().select(user_api="openmp").limit(limits=1)
    except Exception:  # noqa: BLE001 - the jobs still run, on torch's thread count
        pass


def log_media(
    trainer: pl.Trainer,
    *,
    images: Mapping[str, list[MediaImage]] | None = None,
    tables: Mapping[str, MediaTable] | None = None,
    scalars: Mapping[str, float] | None = None,
    step: int,
) -> None:
    """Logs media and scalars to every logger in ``trainer.loggers``.

    Args:
        trainer: the running Trainer (its ``loggers`` are used; none -> nothing happens).
        images: ``{key: [MediaImage, ...]}``; each key is one W&B media panel holding the list.
        tables: ``{key: MediaTable}``.
        scalars: ``{key: value}``.
        step: ``trainer.global_step`` (W&B records it as ``trainer/global_step``).

    Per logger: ``WandbLogger`` gets ``wandb.Image`` with box overlays, ``wandb.Table``
    and scalars in one ``log`` call (one history row), built on the media thread and
    logged from this one by a later call (see the module docstring); ``TensorBoardLogger``
    gets ``add_image`` (boxes drawn in), tables as Markdown text, and scalars; any other
    logger (``CSVLogger``, MLflow, ...) gets the scalars only. The arrays in ``images``
    and ``tables`` must not be changed after the call.
    """
    media = Media(images, tables, scalars)
    wandb_loggers, others = _split(trainer)
    _fan_out(others, media, step)
    if wandb_loggers and (images or tables or scalars):
        _enqueue(trainer, wandb_loggers, [], functools.partial(given, media), step, None)


def log_media_later(
    trainer: pl.Trainer,
    build: Callable[[], Media],
    *,
    step: int,
    then: Callable[[Media], None] | None = None,
) -> None:
    """Like :func:`log_media`, but what is logged comes from ``build()``, run on the media thread.

    For work between the model's outputs and the pixels (projections, plots, tables):
    ``build`` must not touch the model, the trainer or a global RNG, and must not return
    arrays anything else changes. ``then(media)`` runs on the training thread once the
    media are logged (e.g. to write a record from ``media.extra``). Without a W&B logger
    both run at once, on this thread. An exception in ``build`` or ``then`` is a warning.
    """
    wandb_loggers, others = _split(trainer)
    if wandb_loggers:
        _enqueue(trainer, wandb_loggers, others, build, step, then)
        return
    try:
        media = build()
        _fan_out(others, media, step)
        if then is not None:
            then(media)
    except Exception as err:  # noqa: BLE001 - logging must never stop training
        rank_zero_warn(f"[detlens] building the media of step {step} failed: {type(err).__name__}: {err}")


def _split(trainer: pl.Trainer) -> tuple[list[WandbLogger], list[Logger]]:
    loggers = list(trainer.loggers)
    return [lg for lg in loggers if isinstance(lg, WandbLogger)], [lg for lg in loggers if not isinstance(lg, WandbLogger)]


def _fan_out(loggers: list[Logger], media: Media, step: int) -> None:
    """The loggers that are written on this thread (TensorBoard, CSV, ...)."""
    for logger in loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, media.images, media.tables, media.scalars, step)
            elif media.scalars:
                _log_scalars(logger, media.scalars, step)
        except Exception as err:  # noqa: BLE001 - a logger failure must never stop training
            rank_zero_warn(f"[detlens] {type(logger).__name__} failed to log media at step {step}: {type(err).__name__}: {err}")


def _build(build: Callable[[], Media]) -> tuple[Media, dict[str, Any]]:
    """Runs on the media thread (or the drain thread)."""
    return _build_timed(build_payload, build)


def _build_timed(fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)``, its wall and CPU time added to this process's media build time."""
    global _build_seconds, _build_cpu_seconds
    start, start_cpu = time.perf_counter(), time.thread_time()
    try:
        return fn(arg)
    finally:
        with _seconds_lock:  # the media thread and, at a stage end, the drain thread
            _build_seconds += time.perf_counter() - start
            _build_cpu_seconds += time.thread_time() - start_cpu


def media_thread_seconds() -> float:
    """Wall time spent building media in this process's media thread and media process (for benchmarks)."""
    return _build_seconds + (_process.seconds if _process is not None else 0.0)


def media_thread_cpu_seconds() -> float:
    """CPU time of the threads that built media in this process (the media thread, the drain
    thread), not counting native threads they started or the media process (for benchmarks:
    against :func:`media_thread_seconds`, how long the builds waited for a core)."""
    return _build_cpu_seconds


def _media_process() -> MediaProcess:
    global _process
    if _process is None:
        media_dir()  # created (and removed at exit) by this process; the worker inherits it
        _process = MediaProcess(niceness=MEDIA_THREAD_NICENESS)
    return _process


def _use_process(trainer: pl.Trainer) -> bool:
    """:data:`MEDIA_PROCESS` decided for this trainer."""
    setting = MEDIA_PROCESS.strip().lower()
    if setting in ("on", "1", "true", "yes"):
        return True
    if setting in ("off", "0", "false", "no"):
        return False
    try:
        return trainer.strategy.root_device.type != "cpu"
    except Exception:  # noqa: BLE001 - no strategy yet: the thread, which needs nothing
        return False


def _submit(build: Callable[[], Media], use_process: bool) -> tuple[Future, bool]:
    """Starts building ``build``'s media: in the media process when asked and it pickles, else
    on the media thread; the future, and whether it is the media thread's."""
    global _process_broken
    thread_build = lambda: _worker().submit(_build, build)  # noqa: E731
    if use_process and not _process_broken:
        try:
            return _media_process().submit(build_payload, build, fallback=thread_build), False
        except OSError as err:
            _process_broken = True
            rank_zero_warn(f"[detlens] cannot start the media process ({err}); media are built on a thread instead")
        except Exception:  # noqa: BLE001 - it does not pickle (a closure, a lambda): built on the thread
            pass
    return thread_build(), True


def _enqueue(
    trainer: pl.Trainer,
    wandb_loggers: list[WandbLogger],
    others: list[Logger],
    build: Callable[[], Media],
    step: int,
    then: Callable[[Media], None] | None,
) -> None:
    with _lock:
        future, on_thread = _submit(build, _use_process(trainer))
        _pending.append(_Pending(wandb_loggers, others, future, step, then, build if on_thread else None))
    flush_media(wait=False)
    # Bounded in logging events, not entries: one epoch end queues an entry per callback
    # (and scalar-only ones behind them), which must not make training wait.
    while _pending_events() > MAX_PENDING:
        flush_media(wait=True, limit=1)


def _pending_events() -> int:
    with _lock:
        return len({item.step for item in _pending})


def flush_media(wait: bool = True, limit: int | None = None) -> int:
    """Logs the W&B payloads :func:`log_media` has finished building, oldest first.

    Call it from the thread that trains (``wandb.log`` is not thread-safe). With
    ``wait=False`` it stops at the first payload still being built (no waiting); with
    ``wait=True`` it waits for each one (at most :data:`DRAIN_TIMEOUT_S` apiece; one that
    takes longer is dropped with a warning). ``limit`` bounds how many are logged.

    Returns:
        how many payloads were logged or dropped.
    """
    done = 0
    while limit is None or done < limit:
        with _lock:
            if not _pending or not (wait or _pending[0].result.done()):
                return done
            item = _pending.popleft()
            if wait and limit is None and not item.result.done():
                # this one too: it is queued, not running, if a dropped build still holds the media thread
                _hand_queued_builds_to_the_drain_thread([item, *_pending])
        done += 1
        try:
            media, payload, files = item.result.result(timeout=DRAIN_TIMEOUT_S if wait else 0)
        except FutureTimeout:
            if not item.result.cancel():  # already running on the media thread: its files come later
                item.result.add_done_callback(_remove_files_of)
            if _process is not None and _process.owns(item.result):
                _process.kill()  # a stuck worker: a new one takes the jobs queued behind it
            rank_zero_warn(f"[detlens] the media of step {item.step} took over {DRAIN_TIMEOUT_S:.0f} s to build; dropped")
            continue
        except Exception as err:  # noqa: BLE001 - logging must never stop training
            rank_zero_warn(f"[detlens] building the media of step {item.step} failed: {type(err).__name__}: {err}")
            continue
        for logger in item.wandb_loggers:
            try:
                if payload:
                    # Lightning's own log_image/log_table go through log_metrics too (prefix, global step).
                    logger.log_metrics(payload, step=item.step)
            except Exception as err:  # noqa: BLE001 - a logger failure must never stop training
                rank_zero_warn(
                    f"[detlens] {type(logger).__name__} failed to log media at step {item.step}: {type(err).__name__}: {err}"
                )
        remove_files(files)  # wandb.log copied them into the run
        _fan_out(item.other_loggers, media, item.step)
        if item.then is not None:
            try:
                item.then(media)
            except Exception as err:  # noqa: BLE001 - logging must never stop training
                rank_zero_warn(f"[detlens] after logging the media of step {item.step}: {type(err).__name__}: {err}")
    return done


def _hand_queued_builds_to_the_drain_thread(items: list[_Pending]) -> None:
    """At a stage end (the training thread waits for every payload): the builds still queued
    on the media thread or for the media process move to a second thread, so that they are
    built beside the one the media worker is busy with, on the core training no longer uses.

    The drain thread is started by the training thread and keeps its priority (not the
    media worker's ``nice``): its work is what training is waiting for. Only builds the
    media thread has not started move (``Future.cancel`` succeeds on those alone); of the
    media process's jobs, those it has not been sent yet (it gets one at a time,
    :data:`~detlens.sinks.media_process.MAX_IN_FLIGHT`) are shared: the drain thread takes
    the oldest of them whenever it is free, and the process goes on with the next one when
    it has answered (:func:`_help_the_media_process`). Logging order is unchanged: payloads
    are still logged oldest first. Call with ``_lock`` held, on the items still to be logged.

    What this buys is in ``benchmarks/callback_overhead.py``'s "after training" phase: the
    demo's last logging event (Grad-CAM, attention and entropy figures, the box embeddings'
    t-SNE, scatter plot and table: about 1 s of building) is queued when the fit ends.
    """
    for item in items:
        if item.build is None or not item.result.cancel():
            continue
        item.result = _drain().submit(_build, item.build)
        item.build = None
    if _process is not None and _process.has_unsent():
        _drain().submit(_help_the_media_process, _process)


def _drain() -> _DaemonWorker:
    global _drain_executor
    with _executor_lock:
        if _drain_executor is None:
            _drain_executor = _DaemonWorker("detlens-media-drain", initializer=_one_openmp_thread)
        return _drain_executor


def _help_the_media_process(process: MediaProcess) -> None:
    """Runs on the drain thread: builds the media process's jobs that it has not been sent
    yet, oldest first, until none is left (the process builds the others in the meantime).
    A job that raises fails its own future, as on the media thread."""
    while (job := process.take_unsent()) is not None:
        fn, arg, future = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(_build_timed(fn, arg))
        except BaseException as err:  # noqa: BLE001 - reported through the future, like a thread build
            future.set_exception(err)


def _remove_files_of(future: Future) -> None:
    """Removes the image files of a dropped build once it has finished anyway."""
    if not future.cancelled() and future.exception() is None:
        remove_files(future.result()[2])


def _log_scalars(logger: Logger, scalars: Mapping[str, float], step: int) -> None:
    logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)


def _log_tensorboard(
    logger: TensorBoardLogger,
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
    step: int,
) -> None:
    writer = logger.experiment
    for key, items in (images or {}).items():
        for i, item in enumerate(items):
            writer.add_image(f"{key}/{i}", _burn_in_boxes(item), global_step=step, dataformats="HWC")
    for key, table in (tables or {}).items():
        writer.add_text(key, _markdown_table(table), global_step=step)
    if scalars:
        _log_scalars(logger, scalars, step)


def _burn_in_boxes(image: MediaImage) -> Any:
    """TensorBoard has no box overlays: draw ground truth (corners) and predictions (solid)."""
    pixels = image.pixels
    if image.gt_boxes is not None:
        pixels = draw_boxes(pixels, image.gt_boxes, image.gt_labels, class_names=image.class_names, dashed=True)
    if image.pred_boxes is not None:
        pixels = draw_boxes(
            pixels, image.pred_boxes, image.pred_labels, scores=image.pred_scores, class_names=image.class_names
        )
    return pixels


def _markdown_table(table: MediaTable) -> str:
    keep = [i for i, _ in enumerate(table.columns) if not any(isinstance(r[i], MediaImage) for r in table.rows)]
    header = "| " + " | ".join(str(table.columns[i]) for i in keep) + " |"
    rule = "|" + "---|" * len(keep)
    body = ["| " + " | ".join(str(row[i]) for i in keep) + " |" for row in table.rows]
    return "\n".join([header, rule, *body])
