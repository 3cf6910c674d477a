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
worker's own ``sys.stdout`` goes to stderr, so a stray ``print`` cannot corrupt the
stream.

What can go wrong, and what happens:

* the job cannot be pickled in the parent (a closure, a lambda): :meth:`MediaProcess.submit`
  raises and the caller builds on a thread instead;
* the worker cannot unpickle it (a function from a module it cannot import, e.g. the
  user's ``__main__``): the job's ``fallback`` runs it in the parent;
* the job raises: its future raises :class:`MediaJobError` with the worker's message;
* the worker dies (killed, out of memory): every unfinished job's future raises
  :class:`MediaProcessDied`; the next :meth:`~MediaProcess.submit` starts a new worker;
* a worker dies before answering its first job (it cannot import detlens, say): its
  jobs run through their ``fallback`` and :meth:`~MediaProcess.submit` raises ``OSError``
  from then on (the caller builds on a thread).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

__all__ = ["MediaJobError", "MediaProcess", "MediaProcessDied", "main"]

_WORKER_CODE = "from detlens.sinks.media_process import main; main()"
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class MediaJobError(RuntimeError):
    """A job raised in the media process (the message carries its type and text)."""


class MediaProcessDied(RuntimeError):
    """The media process exited before it answered a job."""


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
        self._ids = itertools.count()
        self._proc: subprocess.Popen | None = None
        # job id -> (future, fallback, the worker it was sent to)
        self._jobs: dict[int, tuple[Future, Callable[[], Future] | None, subprocess.Popen]] = {}
        self._outbox: queue.Queue[tuple[int, bytes] | None] | None = None
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
            assert self._outbox is not None
            self._outbox.put((job_id, blob))
        return future

    def owns(self, future: Future) -> bool:
        """Whether ``future`` is a job of this worker that it has not answered yet."""
        with self._lock:
            return any(f is future for f, _, _ in self._jobs.values())

    def kill(self) -> None:
        """Kills the worker now; its unfinished jobs fail with :class:`MediaProcessDied`, the next job starts a new one."""
        with self._lock:
            proc = self._proc
            if proc is not None:
                self._killed.add(proc)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the worker after the jobs already sent (waits at most ``timeout`` s, then kills it)."""
        with self._lock:
            proc, outbox = self._proc, self._outbox
            self._proc = self._outbox = None
        if proc is None:
            return
        if outbox is not None:
            outbox.put(None)  # the writer closes the worker's stdin: it exits after its queue
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
        self._outbox = outbox = queue.Queue()
        self.starts += 1
        threading.Thread(target=self._write, args=(proc, outbox), name="detlens-media-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(proc,), name="detlens-media-reader", daemon=True).start()
        return proc

    def _write(self, proc: subprocess.Popen, outbox: queue.Queue) -> None:
        assert proc.stdin is not None
        try:
            while (item := outbox.get()) is not None:
                pickle.dump(item, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; the reader fails the jobs
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        answered = 0
        while True:
            try:
                job_id, status, value, seconds = pickle.load(proc.stdout)
            except Exception:  # noqa: BLE001 - EOF, or a truncated answer: the worker is gone
                break
            answered += 1
            with self._lock:
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
            if self._proc is proc:
                self._proc = None
                self._outbox = None
            orphans = [self._jobs.pop(k)[:2] for k, job in list(self._jobs.items()) if job[2] is proc]
            killed = proc in self._killed
            self._killed.discard(proc)
            if not answered and not killed:  # it never worked (cannot import detlens, say)
                self.broken = f"it exited with code {code} before answering any job"
        for future, fallback in orphans:
            if self.broken and fallback is not None:
                _chain(fallback, future)
            else:
                _settle(future, error=MediaProcessDied(f"detlens' media process exited (code {code}) before finishing"))


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
            return
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
