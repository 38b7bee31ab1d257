"""Time limits for pure-Python work that may not end (sympy on a pathological expression).

:func:`map_limited` runs a function on each argument, each call with its own limit, wherever the
caller is. In the main thread a signal interrupts the call, as math-verify's timeout does, but
sent to the main thread alone by a watchdog thread (``pthread_kill``) rather than to the whole
process by ``signal.alarm``, which the kernel hands to any thread (a Ray or polars thread, whose
system call it interrupts); the caller's own ITIMER (pytest-timeout's) is left alone, limits may
be under a second, and code that swallows the exception is interrupted again. Python runs
signal handlers only in the main thread, so from any other thread (the local executor's batch
threads, a Ray actor's) the calls go to a worker process instead: there the same timer
interrupts Python code, and the caller kills the worker when even that does not answer in time
(a long C call), then starts a fresh one for the next call. Either way a call over its limit
returns ``TIMED_OUT``, never hangs the run and never raises.

The function and its arguments must be picklable (a module-level function, plain values): the
worker process imports the function's module.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from collections.abc import Callable, Sequence
from typing import Any, Literal

TIMED_OUT = object()  # the result of a call that ran past its limit

# How long the caller waits past the limit before it kills a worker that did not answer: the
# worker's own timer answers at the limit unless a single C call holds it.
WORKER_GRACE_S = 1.0
WORKER_START_S = 120.0  # importing sympy in a fresh process on a busy machine
REFIRE_S = 0.1


class TimeLimitExceeded(BaseException):
    """Raised inside a call that ran past its limit.

    A BaseException, so that the ``except Exception`` of the libraries it interrupts (sympy,
    math-verify) does not swallow it.
    """


def timer_works_here() -> bool:
    """Whether a signal can interrupt code in this thread: only the main thread runs handlers, and
    never in a process where Ray runs (a Ray worker aborted with "Mutex corrupt" in 3 of 20 loaded
    runs that used the signal, so Ray's processes send their calls to a worker process)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return False
    return hasattr(signal, "pthread_kill") and threading.current_thread() is threading.main_thread()


class _Watchdog:
    """One daemon thread per process that sends SIGALRM to the main thread at the armed deadline,
    and again every ``REFIRE_S`` until disarmed (code that swallowed the exception is interrupted
    anew)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.deadline: float | None = None
        self.call = 0  # the number of the call armed last
        self.sent = 0  # signals sent for it
        self.pid = -1

    def arm(self, seconds: float) -> int:
        with self.cond:
            if self.pid != os.getpid():  # first use, or a forked child: the thread is not there
                self.pid = os.getpid()
                threading.Thread(target=self._watch, name="factory-time-limit", daemon=True).start()
            self.call, self.sent = self.call + 1, 0
            self.deadline = time.monotonic() + seconds
            self.cond.notify()
            return self.call

    def disarm(self) -> None:
        with self.cond:
            self.deadline = None

    def _watch(self) -> None:
        main = threading.main_thread().ident
        with self.cond:
            while True:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is None or left > 0:
                    self.cond.wait(left)
                    continue
                self.deadline, self.sent = time.monotonic() + REFIRE_S, self.sent + 1
                signal.pthread_kill(main, signal.SIGALRM)


_WATCHDOG = _Watchdog()


class _Call:
    """One limited call, as the signal handler sees it."""

    def __init__(self, previous):
        self.previous, self.number, self.taken, self.running = previous, -1, 0, True

    def expire(self, signum, frame):
        if _WATCHDOG.call != self.number or self.taken >= _WATCHDOG.sent:  # the caller's own SIGALRM
            if callable(self.previous):
                self.previous(signum, frame)
            return
        self.taken += 1
        if self.running:  # never once the call has returned
            raise TimeLimitExceeded


def call_with_timer(fn: Callable[[Any], Any], arg: Any, seconds: float) -> Any:
    """``fn(arg)``, or ``TIMED_OUT`` when it runs past ``seconds``; main thread only.

    At the limit the watchdog sends SIGALRM to the main thread and the handler raises
    :class:`TimeLimitExceeded` in the running code. A SIGALRM that is not the watchdog's (the
    caller's own timer) goes to the handler the caller had, which is put back afterwards -- once
    every signal sent for this call has been handled, so that none reaches the default handler
    (which ends the process).
    """
    call = _Call(signal.getsignal(signal.SIGALRM))
    signal.signal(signal.SIGALRM, call.expire)
    try:
        try:
            call.number = _WATCHDOG.arm(seconds)
            return fn(arg)
        finally:
            call.running = False
    except TimeLimitExceeded:
        return TIMED_OUT
    finally:
        _WATCHDOG.disarm()  # nothing is sent for this call from here on
        for _ in range(3):  # one sent before arrives when a system call returns, and is handled at a jump
            signal.sigpending()
        signal.signal(signal.SIGALRM, call.previous if call.previous is not None else signal.SIG_DFL)


def _serve(read_fd: int, write_fd: int) -> None:
    """The worker process: answers ``(fn, arg, seconds)`` with ``("ok", value)`` or ``("late", None)``."""
    jobs, conn = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    conn.send("ready")
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, arg, seconds = job
        try:
            if seconds is None:  # a setup, run once with no limit
                conn.send(("ok", fn(arg)))
                continue
            value = call_with_timer(fn, arg, seconds)
            conn.send(("late", None) if value is TIMED_OUT else ("ok", value))
        except Exception as error:  # the function's own failure goes back to the caller
            conn.send(("error", f"{type(error).__name__}: {error}"))


class _Worker:
    """One worker process and its two pipes.

    A fresh interpreter (``python -c``), neither forked (the caller has threads) nor started by
    multiprocessing's spawn, which would import the caller's main script again.
    """

    def __init__(self):
        jobs_read, jobs_write = os.pipe()
        answers_read, answers_write = os.pipe()
        code = (f"import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from {__name__} import _serve; "
                f"_serve({jobs_read}, {answers_write})")
        self.process = subprocess.Popen([sys.executable, "-c", code, json.dumps(sys.path)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, pass_fds=(jobs_read, answers_write))
        os.close(jobs_read)
        os.close(answers_write)
        self.jobs, self.conn = Connection(jobs_write, readable=False), Connection(answers_read, writable=False)
        self.ready: set = set()  # the setups this worker has run
        if not self.conn.poll(WORKER_START_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"the time-limit worker process did not start within {WORKER_START_S:.0f} s")

    def setup(self, fn) -> None:
        """Runs ``fn(None)`` once in this worker, with no limit but the start's."""
        if fn is not None and fn not in self.ready:
            self.jobs.send((fn, None, None))
            if not self.conn.poll(WORKER_START_S):
                self.kill()
                raise RuntimeError(f"the time-limit worker process did not set up within {WORKER_START_S:.0f} s")
            status, value = self.conn.recv()
            if status == "error":
                raise RuntimeError(value)
            self.ready.add(fn)

    def call(self, fn, arg, seconds: float) -> Any:
        self.jobs.send((fn, arg, seconds))
        if not self.conn.poll(seconds + WORKER_GRACE_S):
            self.kill()  # stuck where its own timer cannot reach
            return TIMED_OUT
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return TIMED_OUT if status == "late" else value

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait(5)
        self.jobs.close()
        self.conn.close()

    def close(self) -> None:
        try:
            self.jobs.send(None)
            self.process.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class _WorkerPool:
    """Idle workers of this process, one per thread that needs one at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.pid = os.getpid()

    def take(self) -> _Worker:
        with self.lock:
            if self.pid != os.getpid():  # a forked child does not share its parent's workers
                self.idle, self.pid = [], os.getpid()
            while self.idle:
                worker = self.idle.pop()
                if worker.alive:
                    return worker
        return _Worker()

    def give(self, worker: _Worker) -> None:
        if worker.alive:
            with self.lock:
                self.idle.append(worker)

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.close()


_POOL = _WorkerPool()
atexit.register(_POOL.close)


def map_limited(fn: Callable[[Any], Any], args: Sequence, seconds: float,
                where: Literal["auto", "here", "process"] = "auto",
                setup: Callable[[None], Any] | None = None) -> list:
    """``[fn(arg) for arg in args]``, each call stopped at ``seconds`` (its result then ``TIMED_OUT``).

    ``where``: ``here`` (a timer in this thread; the main thread only), ``process`` (a worker
    process), ``auto`` (here when this is the main thread, else a worker process). ``setup(None)``
    runs first, outside the limit, in the process that makes the calls (imports, caches): the
    first call must not pay for them within its limit.
    """
    if not args:
        return []
    if where == "auto":
        where = "here" if timer_works_here() else "process"
    if where == "here":
        if setup is not None:
            setup(None)
        return [call_with_timer(fn, arg, seconds) for arg in args]
    worker = _POOL.take()
    out = []
    try:
        for arg in args:
            if not worker.alive:
                worker = _Worker()
            worker.setup(setup)
            out.append(worker.call(fn, arg, seconds))
    finally:
        _POOL.give(worker)
    return out


def close_workers() -> None:
    """Stops the idle worker processes (they stop with this process anyway)."""
    _POOL.close()
