"""detlens' media process: builds W&B media in a separate Python process, off the GIL.

Rendering media (matplotlib figures, overlays, PNG encoding, t-SNE) is mostly Python
that holds the GIL. On a thread of the training process it slows every training step
running next to it: each of the step's ops must take the GIL back when it returns
(``benchmarks/media_thread_contention.py``: +11-28% per step at nice 10). A process has
its own GIL; at a lower priority it only takes the CPU time the training leaves.

Protocol (hand-written: ``multiprocessing`` and ``concurrent.futures.ProcessPoolExecutor``
start workers by ``fork``, which hangs or crashes the first OpenMP region of a child of a
process that has run torch ops, or by ``spawn``/``forkserver``, which re-run the user's
``__main__`` module in the worker): the parent starts ``python -c <worker>`` with pipes
as stdin/stdout and sends ``(job_id, pickle.dumps((fn, arg)))``; the worker answers
``(job_id, status, value, seconds)`` in order, one job at a time. A writer and a reader
thread in the parent move the bytes, so the training thread never waits on a pipe. The
writer sends a job only once the worker has answered the one before
(:data:`MAX_IN_FLIGHT`): the jobs behind it stay in the parent, where
:meth:`MediaProcess.take_unsent` can hand them to a thread of the parent instead (at the
end of a stage, when training waits for every job and its cores are free). The
worker's own ``sys.stdout`` goes to stderr, so a stray ``print`` cannot corrupt the
stream.

What can go wrong, and what happens:

* the job cannot be pickled in the parent (a closure, a lambda): :meth:`MediaProcess.submit`
  raises and the caller builds on a thread instead;
* the worker cannot unpickle it (a function from a module it cannot import, e.g. the
  user's ``__main__``): the job's ``fallback`` runs it in the parent;
* the job raises: its future raises :class:`MediaJobError` with the worker's message;
* the worker dies (killed, out of memory): the job it was building fails with
  :class:`MediaProcessDied`, and a new worker starts for the jobs it had not been sent
  yet (nothing of them ran; the next :meth:`~MediaProcess.submit` would start one too);
* a worker dies before answering its first job (it cannot import detlens, say): its
  jobs run through their ``fallback`` and :meth:`~MediaProcess.submit` raises ``OSError``
  from then on (the caller builds on a thread).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_IN_FLIGHT", "MediaJobError", "MediaProcess", "MediaProcessDied", "main"]

MAX_IN_FLIGHT = 1
"""Jobs sent to the worker and not answered yet. The rest wait in the parent, where a
thread of the parent can take them (:meth:`MediaProcess.take_unsent`); one is enough to
keep the worker busy, as sending a job takes milliseconds and building one tenths of a second."""

_WORKER_CODE = "from detlens.sinks.media_process import main; main()"
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class MediaJobError(RuntimeError):
    """A job raised in the media process (the message carries its type and text)."""


class MediaProcessDied(RuntimeError):
    """The media process exited before it answered a job."""


@dataclass
class _Channel:
    """The parent's side of one worker: the jobs not sent yet, and how many are sent and unanswered."""

    unsent: deque = field(default_factory=deque)  # (job_id, blob), oldest first
    in_flight: int = 0
    closing: bool = False  # close(): send what is left, then close the worker's stdin
    gone: bool = False  # the worker exited: the writer stops


class MediaProcess:
    """One worker process that runs picklable ``fn(arg)`` jobs in order.

    Args:
        niceness: how much lower than this process the worker is scheduled (``os.nice``
            increment, Unix; ignored elsewhere).
        threads: intra-op threads the worker's torch, OpenMP and BLAS may use.
    """

    def __init__(self, niceness: int = 10, threads: int = 1) -> None:
        self.niceness = int(niceness)
        self.threads = int(threads)
        self.seconds = 0.0  # time the worker spent running jobs (for benchmarks)
        self.starts = 0
        self.broken: str | None = None  # why no worker can be started (then submit raises OSError)
        self._killed: set[subprocess.Popen] = set()  # the workers kill() stopped
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it for a job and a free slot
        self._ids = itertools.count()
        self._proc: subprocess.Popen | None = None
        # job id -> (future, fallback, the worker it was queued for)
        self._jobs: dict[int, tuple[Future, Callable[[], Future] | None, subprocess.Popen]] = {}
        self._channel: _Channel | None = None
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        """The worker's process id (``None`` before the first job or after it exited)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def submit(self, fn: Callable[[Any], Any], arg: Any, fallback: Callable[[], Future] | None = None) -> Future:
        """Runs ``fn(arg)`` in the worker; the future holds its return value.

        ``fn`` and ``arg`` are pickled here, at once (later changes to ``arg`` are not
        seen). ``fallback`` is called (in the parent) when the worker cannot unpickle
        them; the future then takes the result of the future it returns.

        Raises:
            pickle.PicklingError, TypeError, AttributeError: ``fn`` or ``arg`` cannot be pickled.
            OSError: the worker cannot be started, or a worker exited before answering
                any job (its jobs went to their ``fallback``).
        """
        if self.broken:
            raise OSError(f"detlens' media process does not work here: {self.broken}")
        blob = pickle.dumps((fn, arg), protocol=pickle.HIGHEST_PROTOCOL)
        future: Future = Future()
        with self._lock:
            proc = self._ensure_started()
            job_id = next(self._ids)
            self._jobs[job_id] = (future, fallback, proc)
            assert self._channel is not None
            self._channel.unsent.append((job_id, blob))
            self._wake.notify_all()
        return future

    def has_unsent(self) -> bool:
        """Whether any job waits in the parent, not sent to the worker yet (see :meth:`take_unsent`)."""
        with self._lock:
            return self._channel is not None and bool(self._channel.unsent)

    def take_unsent(self) -> tuple[Callable[[Any], Any], Any, Future] | None:
        """The oldest job not sent to the worker yet, taken back: ``(fn, arg, future)``,
        which the caller now runs (and settles the future of); ``None`` when there is none.

        For the end of a stage: the worker goes on with the job it has, and a thread of the
        parent, at training's priority and on a core training no longer uses, builds the
        ones behind it. ``fn`` and ``arg`` are unpickled from the bytes :meth:`submit`
        made, so they are what the worker would have run.
        """
        with self._lock:
            channel = self._channel
            while channel is not None and channel.unsent:
                job_id, blob = channel.unsent.popleft()
                future, _, _ = self._jobs.pop(job_id, (None, None, None))
                if future is None or future.cancelled():
                    continue
                fn, arg = pickle.loads(blob)  # noqa: S301 - bytes this process pickled itself
                return fn, arg, future
        return None

    def owns(self, future: Future) -> bool:
        """Whether ``future`` is a job of this worker that it has not answered yet."""
        with self._lock:
            return any(f is future for f, _, _ in self._jobs.values())

    def kill(self) -> None:
        """Kills the worker now: the job it was building fails with :class:`MediaProcessDied`,
        the ones it had not been sent go to a new worker."""
        with self._lock:
            proc = self._proc
            if proc is not None:
                self._killed.add(proc)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the worker after the jobs already submitted (waits at most ``timeout`` s, then kills it)."""
        with self._lock:
            proc, channel = self._proc, self._channel
            self._proc = self._channel = None
            if channel is not None:
                channel.closing = True  # the writer sends what is left, then closes the worker's stdin
                self._wake.notify_all()
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------------ parent internals
    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        # The worker imports what the parent imports from where the parent imports it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        for name in _THREAD_ENV:
            env[name] = str(self.threads)
        env["CUDA_VISIBLE_DEVICES"] = ""  # media work is CPU work; the worker never holds a GPU context
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter running our own module
            [sys.executable, "-c", _WORKER_CODE, str(self.niceness), str(self.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._proc = proc
        self._channel = channel = _Channel()
        self.starts += 1
        threading.Thread(target=self._write, args=(proc, channel), name="detlens-media-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(proc, channel), name="detlens-media-reader", daemon=True).start()
        return proc

    def _next_to_send(self, channel: _Channel) -> tuple[int, bytes] | None:
        """Waits for a job to send and a free slot (:data:`MAX_IN_FLIGHT`); ``None``: stop."""
        with self._wake:
            while True:
                if channel.gone:
                    return None
                if channel.unsent and channel.in_flight < MAX_IN_FLIGHT:
                    channel.in_flight += 1
                    return channel.unsent.popleft()
                if channel.closing and not channel.unsent:
                    return None
                self._wake.wait()

    def _write(self, proc: subprocess.Popen, channel: _Channel) -> None:
        assert proc.stdin is not None
        try:
            while (item := self._next_to_send(channel)) is not None:
                pickle.dump(item, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; the reader fails the jobs
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _read(self, proc: subprocess.Popen, channel: _Channel) -> None:
        assert proc.stdout is not None
        answered = 0
        while True:
            try:
                job_id, status, value, seconds = pickle.load(proc.stdout)
            except Exception:  # noqa: BLE001 - EOF, or a truncated answer: the worker is gone
                break
            answered += 1
            with self._lock:
                channel.in_flight -= 1
                self._wake.notify_all()  # the writer may send the next job
                future, fallback, _ = self._jobs.pop(job_id, (None, None, None))
            if future is None:
                continue
            self.seconds += seconds
            if status == "unloadable" and fallback is not None:
                _chain(fallback, future)
            elif status == "ok":
                _settle(future, value)
            else:
                _settle(future, error=MediaJobError(value))
        code = proc.wait()
        with self._lock:
            channel.gone = True
            unsent = list(channel.unsent)
            channel.unsent.clear()
            self._wake.notify_all()
            if self._proc is proc:
                self._proc = None
                self._channel = None
            killed = proc in self._killed
            self._killed.discard(proc)
            if not answered and not killed:  # it never worked (cannot import detlens, say)
                self.broken = f"it exited with code {code} before answering any job"
            if not self.broken and not channel.closing:
                self._resend(unsent)  # never sent: nothing of them ran, so a new worker builds them
            # the jobs it had, and those it had not been sent that no worker takes, fail (or fall back)
            orphans = [self._jobs.pop(k)[:2] for k, job in list(self._jobs.items()) if job[2] is proc]
        for future, fallback in orphans:
            if self.broken and fallback is not None:
                _chain(fallback, future)
            else:
                _settle(future, error=MediaProcessDied(f"detlens' media process exited (code {code}) before finishing"))

    def _resend(self, jobs: list[tuple[int, bytes]]) -> None:
        """Queues jobs a dead worker was never sent for a new worker (started now, if none
        runs); if none can start they stay tied to the dead one. Call with ``_lock`` held."""
        jobs = [(job_id, blob) for job_id, blob in jobs if job_id in self._jobs]
        if not jobs:
            return
        try:
            proc = self._ensure_started()
        except OSError:
            return
        assert self._channel is not None
        for job_id, blob in jobs:
            future, fallback, _ = self._jobs[job_id]
            self._jobs[job_id] = (future, fallback, proc)
            self._channel.unsent.append((job_id, blob))
        self._wake.notify_all()


def _settle(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Sets the result or exception, unless the waiter has cancelled the future meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


def _chain(start: Callable[[], Future], future: Future) -> None:
    try:
        inner = start()
    except Exception as err:  # noqa: BLE001 - reported through the future
        _settle(future, error=err)
        return

    def copy(done: Future) -> None:
        if done.cancelled():
            future.cancel()
        elif done.exception() is not None:
            _settle(future, error=done.exception())
        else:
            _settle(future, done.result())

    inner.add_done_callback(copy)


# ---------------------------------------------------------------------- the worker


def main() -> None:
    """The worker's loop (``python -c``): ``argv`` = niceness, threads."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr, never into the stream
    sys.stdout = sys.stderr
    niceness, threads = (int(v) for v in sys.argv[1:3])
    if niceness > 0 and hasattr(os, "nice"):
        try:
            os.nice(niceness)
        except OSError:
            pass
    jobs = sys.stdin.buffer
    while True:
        try:
            job_id, blob = pickle.load(jobs)
        except EOFError:
            # Every answer is flushed and the worker owns no files (the parent's media folder
            # holds what it wrote), so it leaves without the interpreter's teardown of torch,
            # matplotlib and wandb: 1.6 s, which the parent's close() (at its exit) waited for.
            sys.stderr.flush()
            os._exit(0)
        start = time.perf_counter()
        try:
            fn, arg = pickle.loads(blob)
        except Exception as err:  # noqa: BLE001 - the parent runs it itself
            _answer(answers, job_id, "unloadable", f"{type(err).__name__}: {err}", start)
            continue
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        try:
            value = fn(arg)
        except Exception as err:  # noqa: BLE001 - reported to the parent
            _answer(answers, job_id, "error", f"{type(err).__name__}: {err}", start)
            continue
        _answer(answers, job_id, "ok", value, start)


def _answer(stream: Any, job_id: int, status: str, value: Any, start: float) -> None:
    seconds = time.perf_counter() - start
    try:
        data = pickle.dumps((job_id, status, value, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - an unpicklable result is the job's error
        data = pickle.dumps((job_id, "error", f"its result cannot be pickled: {type(err).__name__}: {err}", seconds))
    try:
        stream.write(data)
        stream.flush()
    except (BrokenPipeError, OSError):  # the parent is gone (killed): nothing left to answer
        os._exit(0)
