"""The sandbox: runs code a model wrote in its own process, with limits, no network and no privileges.

One run is one process, ``python -I -S -B`` on :mod:`factory.sandbox_harness`:

* its own session and process group (``start_new_session``), killed whole (``killpg``,
  SIGKILL) when it passes its wall time or its output cap, and when it ends (stray children);
* its own fresh temporary folder (in /dev/shm where there is one), its working directory,
  ``HOME`` and ``TMPDIR``, removed after;
* hard limits: address space (``RLIMIT_AS``), CPU seconds (``RLIMIT_CPU``), file size
  (``RLIMIT_FSIZE``), processes (``RLIMIT_NPROC``), no core dumps; a cap on what it prints;
* a new network namespace, where the machine allows one (else a note says so);
* when the factory runs as root, the unprivileged user ``nobody``, owner of the run's folder only;
* an audit hook inside the interpreter that refuses processes, signals to others, sockets,
  ctypes and writes outside the folder (a second layer: native code can get past it).

:func:`run_python` runs one program (its stdin, setup code, tests and calls);
:func:`run_many` runs many over a thread pool, one process each, as many at once as
``workers`` (default: the cores). Nothing here knows about recipes or steps: the ``verify``
step (:mod:`factory.steps.verify_code`) and any other user of model-written code share it.

Example:
    >>> result = run_python("print(input()[::-1])", stdin="abc")
    >>> result.outcome, result.stdout
    ('exited', 'cba\\n')
"""

from __future__ import annotations

import functools
import importlib.util
import marshal
import math
import os
import py_compile
import pwd
import re
import secrets
import selectors
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FactoryError

HARNESS = Path(__file__).with_name("sandbox_harness.py")
DRAIN_SECONDS = 0.5  # after the process ends, how long its pipes may stay open (a child that left the group)


class SandboxError(FactoryError):
    """The sandbox itself could not start a run (not the program's fault)."""


@dataclass(frozen=True)
class Limits:
    """What one run may use.

    Attributes:
        time: wall-clock seconds before the whole process group is killed (outcome ``timeout``).
        cpu: CPU seconds (``RLIMIT_CPU``); None: ``time`` plus one second, rounded up (see
            :attr:`cpu_seconds`).
        memory_mb: address space in MiB (``RLIMIT_AS``): an allocation past it raises MemoryError.
        output_bytes: the most the run may print on stdout, on stderr, or write to one file
            (``RLIMIT_FSIZE``); past it the group is killed (outcome ``output_limit``).
        processes: ``RLIMIT_NPROC`` of the user the run has (counts all of that user's processes).
        network: allow the network (no new network namespace).
        audit_hook: refuse forbidden operations inside the interpreter (the second layer; off
            only to test the first).
        user: the user a root factory runs the program as (name or uid); None keeps root.
    """

    time: float = 10.0
    cpu: float | None = None
    memory_mb: int = 1024
    output_bytes: int = 8 << 20
    processes: int = 64
    network: bool = False
    audit_hook: bool = True
    user: str | int | None = "nobody"

    @property
    def cpu_seconds(self) -> int:
        """``RLIMIT_CPU``: ``cpu``, else a second more than ``time`` (rounded up). With the two equal,
        a busy loop met whichever limit the scheduler let it reach first; a second apart, the wall
        clock (the limit people set) ends it, and the CPU limit stays the backstop for threads that
        burn CPU faster than the clock runs."""
        return max(1, math.ceil(self.cpu if self.cpu is not None else self.time + 1))


@dataclass(frozen=True)
class Program:
    """One run: code, what it reads on stdin, and what runs around it.

    Attributes:
        code: the program (untrusted).
        stdin: its standard input (None: empty).
        setup: code run first, in the same namespace (imports, helpers the tests need).
        tests: snippets run after the program, each in a copy of its namespace; each one's
            outcome is reported (``test`` records). With tests, calls or an entry point the
            program runs as module ``solution``, else as ``__main__`` (a script).
        calls: ``(function, args)`` to call after the tests; each result is reported as JSON.
        entry_point: a function the program must define (a ``no_entry_point`` record if not).
    """

    code: str
    stdin: str | bytes | None = None
    setup: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    calls: tuple[tuple[str, tuple | list], ...] = ()
    entry_point: str | None = None


@dataclass
class RunResult:
    """What one run did.

    Attributes:
        outcome: ``exited`` (it ended by itself), ``timeout`` (wall time or CPU seconds),
            ``output_limit``, or ``signal`` (killed by a signal that was not ours).
        exit_code: its exit status (None unless ``exited``).
        signal: the name of the signal that ended it, if one did.
        stdout, stderr: what it printed (up to the cap), decoded as UTF-8.
        records: what the harness reported, in order, as tuples ``(kind, *fields)``: ``note``,
            ``error`` (stage, type, detail, refused), ``exit`` (code, stage), ``no_entry_point``,
            ``test`` (index, ok/fail, type, detail, refused), ``call`` (index, ok/fail, ...), ``done``.
        notes: protections the machine did not allow (no network namespace...).
        started, ended: ``time.monotonic()`` at the start and the end.
        pid: the run's process id, also its process group's (gone by the time this returns).
    """

    outcome: str
    exit_code: int | None
    signal: str | None
    stdout: str
    stderr: str
    records: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    pid: int = 0

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def completed(self) -> bool:
        """The harness ran everything to its end (the ``done`` record, which no early exit writes)."""
        return any(r[0] == "done" for r in self.records)

    def first(self, kind: str) -> tuple[str, ...] | None:
        return next((r for r in self.records if r[0] == kind), None)

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [r for r in self.records if r[0] == kind]


def run_python(code: str, *, stdin: str | bytes | None = None, limits: Limits = Limits(),
               setup: Sequence[str] = (), tests: Sequence[str] = (), calls: Sequence[tuple[str, Sequence]] = (),
               entry_point: str | None = None) -> RunResult:
    """Runs ``code`` once in the sandbox (see :class:`Program` for the arguments)."""
    return run_program(Program(code, stdin, tuple(setup), tuple(tests), tuple(calls), entry_point), limits)


def run_many(programs: Iterable[Program], limits: Limits = Limits(), workers: int | None = None) -> list[RunResult]:
    """Runs each program in its own sandboxed process, ``workers`` at a time (default: the
    cores this process may use); results in the programs' order."""
    programs = list(programs)
    workers = max(1, min(workers or default_workers(), len(programs)))
    if workers == 1:
        return [run_program(p, limits) for p in programs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(functools.partial(run_program, limits=limits), programs))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_program(program: Program, limits: Limits = Limits()) -> RunResult:
    """Runs one :class:`Program`; see the module's docstring for what surrounds it."""
    folder = tempfile.mkdtemp(prefix="factory-sandbox-", dir=folder_base())
    fds: list[int] = []
    try:
        user = unprivileged(limits.user) if os.geteuid() == 0 and limits.user is not None else None
        if user is not None:
            os.chown(folder, *user)
        token = secrets.token_hex(16)
        report_r, report_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds += [report_r, report_w, out_r, out_w, err_r, err_w]
        spec_fd = memory_file(marshal.dumps(job_spec(program, limits, folder, user, token, report_w)))
        fds.append(spec_fd)
        stdin = subprocess.DEVNULL
        if program.stdin is not None:
            data = program.stdin.encode() if isinstance(program.stdin, str) else program.stdin
            stdin = memory_file(data)
            fds.append(stdin)
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", harness_launcher(), str(spec_fd)], cwd=folder,
                env=child_env(folder), stdin=stdin, stdout=out_w, stderr=err_w, pass_fds=(spec_fd, report_w),
                start_new_session=True)
        except OSError as err:
            raise SandboxError(f"the sandbox could not start {sys.executable}: {err}") from err
        for fd in (report_w, out_w, err_w, spec_fd) + ((stdin,) if isinstance(stdin, int) and stdin >= 0 else ()):
            os.close(fd)
            fds.remove(fd)
        try:
            outcome, streams = watch(process, (out_r, err_r, report_r), limits, started)
        except BaseException:  # Ctrl-C, or a failure of ours: the run must not outlive it
            kill_group(process.pid)
            process.wait()
            raise
        ended = time.monotonic()
        return result_of(process, outcome, streams, token, started, ended, user, limits)
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def job_spec(program: Program, limits: Limits, folder: str, user, token: str, report_fd: int) -> dict:
    return {"token": token, "report_fd": report_fd, "folder": folder, "network": limits.network,
            "hook": limits.audit_hook, "memory": limits.memory_mb << 20, "cpu": limits.cpu_seconds,
            "file_size": limits.output_bytes, "processes": limits.processes, "user": user,
            "keep_read": user is not None and not interpreter_readable_by(*user),
            "site": site_dirs(), "code": program.code, "setup": list(program.setup), "tests": list(program.tests),
            "calls": [[name, list(args)] for name, args in program.calls], "entry_point": program.entry_point}


def watch(process: subprocess.Popen, fds: tuple[int, int, int], limits: Limits,
          started: float) -> tuple[str | None, dict[int, bytearray]]:
    """Reads the run's pipes until it ends, passes its wall time or its output cap; kills its
    group; returns why it was killed (None: it ended by itself) and what it wrote."""
    streams = {fd: bytearray() for fd in fds}
    selector = selectors.DefaultSelector()
    for fd in fds:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = pid_descriptor(process.pid)
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ)
    outcome, deadline = None, started + limits.time
    try:
        while outcome is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = "timeout"
                break
            ended = False
            for key, _ in selector.select(remaining if pidfd is not None else min(remaining, 0.01)):
                if key.fd == pidfd:
                    ended = True
                elif not read_into(key.fd, streams, selector, limits.output_bytes):
                    outcome = "output_limit"
            if ended or (pidfd is None and process.poll() is not None):
                break
        kill_group(process.pid)  # before reaping, while the group's id cannot be reused
        process.wait()
        drain(selector, streams, limits.output_bytes, pidfd)
        await_group(process.pid)
    finally:
        selector.close()
        if pidfd is not None:
            os.close(pidfd)
    return outcome, streams


def read_into(fd: int, streams: dict[int, bytearray], selector, cap: int) -> bool:
    """Reads what ``fd`` has; False when its stream passed ``cap``."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return True
    if not chunk:
        selector.unregister(fd)
        return True
    buffer = streams[fd]
    buffer += chunk
    if len(buffer) > cap:
        del buffer[cap:]
        return False
    return True


def drain(selector, streams: dict[int, bytearray], cap: int, pidfd: int | None) -> None:
    """What the pipes still hold after the process ended, until each closes (or briefly, when a
    child that left the group still holds one)."""
    if pidfd is not None:
        selector.unregister(pidfd)
    deadline = time.monotonic() + DRAIN_SECONDS
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
            read_into(key.fd, streams, selector, cap)


def result_of(process, outcome: str | None, streams: dict[int, bytearray], token: str, started: float,
              ended: float, user, limits: Limits) -> RunResult:
    out_r, err_r, report_r = streams
    code, signal_name = process.returncode, None
    if code is not None and code < 0:
        signal_name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        if outcome is None:
            outcome = "timeout" if -code == signal.SIGXCPU else "signal"
        code = None
    records = parse_report(bytes(streams[report_r]), token)
    notes = [r[1] for r in records if r[0] == "note" and len(r) > 1]
    if os.geteuid() != 0:
        notes.append("not root: the program ran as this user (files it may write are this user's)")
    elif user is None:
        notes.append("ran as root (limits.user is None): file permissions do not confine it")
    return RunResult(outcome or "exited", code if outcome is None else None, signal_name,
                     bytes(streams[out_r]).decode("utf-8", "replace"), bytes(streams[err_r]).decode("utf-8", "replace"),
                     [r for r in records if r[0] != "note"], notes, started, ended, process.pid)


ESCAPE = re.compile(r"\\(.)")
UNESCAPED = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def parse_report(data: bytes, token: str) -> list[tuple[str, ...]]:
    """The harness's lines that carry the run's token, as tuples of fields."""
    records = []
    for line in data.decode("utf-8", "replace").split("\n"):
        head, _, rest = line.partition("\t")
        if head != token or not rest:
            continue
        records.append(tuple(ESCAPE.sub(lambda m: UNESCAPED.get(m.group(1), m.group(1)), part)
                             for part in rest.split("\t")))
    return records


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def await_group(pgid: int, seconds: float = 2.0) -> None:
    """Waits until no process of the group is alive (children the run forked die with it; init
    reaps them, in its own time: a zombie does not count); kills again meanwhile, in case one
    was forking. Returns at once for a run that forked nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not alive_in_group(pgid):
            return
        time.sleep(0.005)


def alive_in_group(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is alive, as /proc says (True where it cannot say)."""
    try:
        stats = os.listdir("/proc")
    except OSError:
        return True
    for name in stats:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def pid_descriptor(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` ends (Linux 5.3+), else None (polling)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def memory_file(data: bytes) -> int:
    """A descriptor of an anonymous file holding ``data``, at its start."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sandbox")
    else:
        fd, path = tempfile.mkstemp(prefix="factory-sandbox-")
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.lru_cache(maxsize=None)
def harness_launcher() -> str:
    """The ``-c`` code that starts the harness from its bytecode, which it writes first when it
    can (a script given by path would be compiled at every start: 13 ms of a 30 ms run)."""
    cached = importlib.util.cache_from_source(str(HARNESS))
    try:
        if not os.path.exists(cached) or os.stat(cached).st_mtime < os.stat(HARNESS).st_mtime:
            py_compile.compile(str(HARNESS), cfile=cached, doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # a read-only install: the harness compiles at each start, slower but the same
    return f"import sys; sys.path.insert(0, {str(HARNESS.parent)!r}); import sandbox_harness; sandbox_harness.main()"


def child_env(folder: str) -> dict[str, str]:
    # One thread per BLAS/OpenMP library: a run gets one core's share, and a pool of threads
    # would reserve address space against RLIMIT_AS.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": folder,
            "TMPDIR": folder, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=None)
def folder_base() -> str:
    """Where run folders go: /dev/shm when it is there to write (a folder made and removed on
    disk costs ~3 ms, a tenth of a run), else the temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()


@functools.lru_cache(maxsize=None)
def unprivileged(user: str | int) -> tuple[int, int]:
    """``(uid, gid)`` of ``user`` (a name or a uid); ``nobody`` is 65534 where it has no entry."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        if isinstance(user, int):
            return user, user
        if user == "nobody":
            return 65534, 65534
        raise SandboxError(f"the sandbox's user {user!r} does not exist; create it or set Limits.user to a uid")


@functools.lru_cache(maxsize=None)
def site_dirs() -> list[str]:
    """Where this interpreter's installed packages are (the run gets them on ``sys.path``, without
    running ``site`` and its ``.pth`` files, which cost every run a startup)."""
    dirs = site.getsitepackages() if hasattr(site, "getsitepackages") else []
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@functools.lru_cache(maxsize=None)
def interpreter_readable_by(uid: int, gid: int) -> bool:
    """Whether ``uid`` can reach the interpreter, its standard library and its packages (a
    pyenv Python under /root, mode 0700, is not)."""
    paths = [os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             *site_dirs()]
    for path in paths:
        parts = Path(path).parts
        for depth in range(1, len(parts) + 1):
            try:
                st = os.stat(Path(*parts[:depth]))
            except OSError:
                break
            bits = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
            if not st.st_mode & bits:
                return False
    return True
