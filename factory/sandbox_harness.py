"""The process side of the sandbox: what a sandboxed ``python -I -S -B`` does before and around a program.

:mod:`factory.sandbox` starts a Python that imports this file (from its cached bytecode: a
script would be compiled at every start) and calls :func:`main`, in a new session, in the
run's own folder; its job comes marshalled on the descriptor named by the last argument.
Before any untrusted line runs it:

1. enters a new network namespace (``unshare(CLONE_NEWNET)``, with ``CLONE_NEWUSER`` when not
   root), so the program sees no network interface but a loopback that is down;
2. sets hard resource limits (address space, CPU seconds, file size, processes, no core dumps);
3. when root, becomes the unprivileged user (``nobody``), which owns the run's folder and
   nothing else; ``no_new_privs`` keeps it from gaining privileges back through a set-uid file;
4. adds an audit hook (PEP 578) that refuses, with a :class:`Refused` error, what a test has
   no business doing: starting processes, signalling others, sockets, ctypes, writing or
   deleting outside the folder, changing limits, reading the interpreter's objects.

Then it runs the job's setup code, the program, its tests and its calls, and writes what
happened, line by line, to the report pipe the parent reads: ``token<TAB>kind<TAB>fields``.
The token is a secret of the run: a program that leaves early (``sys.exit(0)``,
``os._exit(0)``) cannot write the ``done`` line that says its tests ran to their end.

This file imports nothing from the factory (it runs with ``-I -S``: no site, no project path),
and binds every function it calls after the program starts, so that a program that replaces
``os.write`` or ``builtins.str`` changes nothing here.
"""

import os
import sys

# Bound now: the program may replace the names in os, sys and builtins, not these objects.
_write, _getcwd, _lstat, _readlink, _fsdecode = os.write, os.getcwd, os.lstat, os.readlink, os.fsdecode
_str, _int, _isinstance, _type, _len, _repr = str, int, isinstance, type, len, repr
_exec, _compile, _getattr, _hasattr, _dict, _function = exec, compile, getattr, hasattr, dict, type(lambda: 0)
_CONTAINERS, _dict_items = (list, tuple, set, frozenset, dict), dict.items
_join, _replace, _encode, _startswith, _split = str.join, str.replace, str.encode, str.startswith, str.split
_BaseException, _SystemExit, _AssertionError = BaseException, SystemExit, AssertionError
HERE = os.path.dirname(os.path.abspath(__file__))
DETAIL_CHARS = 300  # a detail is one short line: the last line of a traceback, a failing assert


class Refused(PermissionError):
    """An operation the sandbox does not allow (raised by its audit hook)."""


def main() -> None:
    import marshal

    spec_fd = _int(sys.argv[-1])
    with os.fdopen(spec_fd, "rb") as spec_file:  # closed at once: the token must not stay readable
        spec = marshal.loads(spec_file.read())
    report = reporter(spec["report_fd"], spec.pop("token"))
    for note in isolate(spec):
        report("note", note)
    sys.modules.pop(__name__, None)  # the program imports nothing of this file
    if spec["hook"]:
        install_hook(spec["folder"])
    raise _SystemExit(run(spec, report))


def reporter(fd: int, token: str):
    """A function that writes one report line, made only of objects bound here."""
    head = _encode(token + "\t", "utf-8")

    def report(kind, *fields, _w=_write, _fd=fd, _head=head):
        parts = [kind]
        for field in fields:
            text = field if _type(field) is _str else _repr(field) if _type(field) in (_int, bool) else \
                _join("", (field,)) if _isinstance(field, _str) else "?"
            for old, new in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
                text = _replace(text, old, new)
            parts.append(text)
        try:
            _w(_fd, _head + _encode(_join("\t", parts) + "\n", "utf-8", "backslashreplace"))
        except OSError:  # the program closed the pipe: the parent sees no `done`
            pass

    return report


# -- isolation, before the program ---------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 1, 8, 38
CAP_DAC_READ_SEARCH = 2


def isolate(spec: dict) -> list[str]:
    """Network namespace, limits and user, in that order (the namespace needs the privileges
    the user change gives up); returns a note for each protection the machine refused."""
    import ctypes
    import resource

    notes = []
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    if not spec["network"]:
        notes += enter_network_namespace(libc, root)
    # The CPU limit's hard value is a second later: the soft one sends SIGXCPU, which says why.
    for limit, soft, hard in ((resource.RLIMIT_AS, spec["memory"], spec["memory"]),
                              (resource.RLIMIT_CPU, spec["cpu"], spec["cpu"] + 1),
                              (resource.RLIMIT_FSIZE, spec["file_size"], spec["file_size"]),
                              (resource.RLIMIT_NPROC, spec["processes"], spec["processes"]),
                              (resource.RLIMIT_CORE, 0, 0)):
        try:
            resource.setrlimit(limit, (soft, hard))
        except (ValueError, OSError) as err:
            notes.append(f"limit {limit} not set: {err}")
    user = spec["user"]
    if root and user is not None:
        notes += become(libc, user[0], user[1], spec["keep_read"])
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        notes.append("no_new_privs not set")
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after the user change, which clears it
    return notes


def enter_network_namespace(libc, root: bool) -> list[str]:
    import ctypes

    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return [f"network not isolated: unshare refused ({os.strerror(ctypes.get_errno())})"]
    if not root:  # map our own ids into the new user namespace, so files we create keep our uid
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return []


def become(libc, uid: int, gid: int, keep_read: bool) -> list[str]:
    """Switches to ``uid``/``gid`` for good. With ``keep_read`` (the interpreter's files lie
    where that user cannot go, as under /root), keeps only the capability to read files."""
    import ctypes

    if keep_read:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if not keep_read:
        return []

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    failed = libc.capset(ctypes.byref(header), data) != 0
    libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    return ["kept CAP_DAC_READ_SEARCH (the interpreter lies where the unprivileged user cannot read): "
            "the program can read any file" + (" (capset failed)" if failed else "")]


# -- the audit hook --------------------------------------------------------------------------------

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PROCESSES = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
             "os.startfile", "pty.spawn"}
NETWORK = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
CHANGES = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "os.truncate", "os.setxattr",
           "os.removexattr", "os.chflags", "os.lchflags", "os.lchmod", "shutil.rmtree"}
PAIRS = {"os.rename", "os.link", "os.symlink"}
INTERNALS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "resource.setrlimit", "resource.prlimit",
             "setopencodehook", "cpython.PyInterpreterState_New"}
UNSAFE_MODULES = {"_posixsubprocess": "starting processes", "_xxsubinterpreters": "sub-interpreters"}
DEVICES = {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2", "/proc/self/fd/1",
           "/proc/self/fd/2"}


def install_hook(folder: str) -> None:
    """Adds the audit hook that refuses, inside this interpreter, what the program may not do.

    Only objects bound here are used, and no Python-level path helper (``os.path.realpath``
    looks ``os.getcwd`` up at every call, so a program could replace it)."""
    folder = resolve(folder)
    inside_prefix = folder + "/"
    pid = os.getpid()
    busy = []

    def inside(path) -> bool:
        if _isinstance(path, _int):
            return True  # a descriptor the program already holds
        text = _fsdecode(path) if _isinstance(path, (bytes, bytearray)) else _join("", (path,)) \
            if _isinstance(path, _str) else None
        if text is None:
            return False
        if text in DEVICES:  # before resolving: /dev/stdout leads to a pipe, which has no path
            return True
        full = resolve(text)
        return full == folder or _startswith(full, inside_prefix) or full in DEVICES

    def refuse(what: str, path=None):
        raise Refused(f"sandbox: {what} is not allowed" + (f": {_fsdecode(path) if _isinstance(path, bytes) else path}"
                                                           if path is not None else ""))

    def hook(event, args):
        if busy:
            return
        busy.append(1)
        try:
            check(event, args)
        finally:
            busy.pop()

    def check(event, args):
        if event == "open":
            path, mode, flags = args
            writing = not _isinstance(flags, _int) or flags & WRITE_FLAGS  # builtin open and os.open give flags
            if writing and not inside(path):
                refuse("writing outside the run's folder", path)
            if mode is None and not writing and not _isinstance(path, _int) and not inside(path) and is_dir(path):
                refuse("opening a folder outside the run's folder (writes relative to it would escape)", path)
        elif event in CHANGES:
            if not inside(args[0]) or (_len(args) > 1 and _type(args[-1]) is _int and args[-1] != -1
                                       and event != "os.truncate"):
                refuse("changing files outside the run's folder", args[0])
        elif event in PAIRS:
            if not inside(args[1]) or (event != "os.symlink" and not inside(args[0])):
                refuse("moving or linking files across the run's folder", args[1])
        elif event in PROCESSES:
            refuse("starting processes")
        elif event in NETWORK:
            refuse("network access")
        elif event in ("os.kill", "os.killpg"):
            if args[0] != pid:
                refuse("signalling other processes")
        elif event == "signal.pthread_kill" or event in INTERNALS:
            refuse(event)
        elif event == "import" and args[0] in UNSAFE_MODULES:
            refuse(UNSAFE_MODULES[args[0]])
        elif _startswith(event, "ctypes."):
            refuse("ctypes")

    sys.addaudithook(hook)


def is_dir(path) -> bool:
    try:
        return (_lstat(path).st_mode & 0o170000) == 0o040000
    except (OSError, TypeError, ValueError):
        return False


def resolve(path: str) -> str:
    """``path`` made absolute, with ``.``, ``..`` and symbolic links of existing parts resolved."""
    if not _startswith(path, "/"):
        path = _getcwd() + "/" + path
    parts, done, hops = _split(path, "/")[::-1], [], 0
    while parts:
        part = parts.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + _join("/", done + [part])
        try:
            is_link = (_lstat(candidate).st_mode & 0o170000) == 0o120000
        except (OSError, ValueError):
            is_link = False
        if is_link and hops < 40:
            hops += 1
            target = _readlink(candidate)
            if _startswith(target, "/"):
                done = []
            parts.extend(_split(target, "/")[::-1])
            continue
        done.append(part)
    return "/" + _join("/", done)


# -- the program and its tests ---------------------------------------------------------------------

def run(spec: dict, report) -> int:
    """Runs setup, the program, its tests and its calls; returns the exit status.

    Setup and program share one namespace (the module ``__main__`` for a script, ``solution``
    otherwise, so that a program's ``if __name__ == "__main__":`` block runs only as a script).
    Each test runs in a copy of it holding the helpers its rewritten asserts call: what the
    program does to its own globals cannot reach them."""
    sys.path[:] = [p for p in sys.path if p and p != HERE] + spec["site"]
    script = not (spec["tests"] or spec["calls"] or spec["entry_point"])
    module = _type(sys)("__main__" if script else "solution")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    namespace["__builtins__"] = __builtins__
    sources = {}
    stages = [(f"<setup {i}>", code, "setup") for i, code in enumerate(spec["setup"])]
    stages.append(("solution.py", spec["code"], "code"))
    for filename, code, stage in stages:
        sources[filename] = code
        status = execute(code, filename, namespace, stage, report, sources, script)
        if status is not None:
            return status
    if spec["entry_point"] and find(namespace, spec["entry_point"]) is None:
        report("no_entry_point", spec["entry_point"])
        return 1
    for i, test in enumerate(spec["tests"]):
        filename = f"<test {i}>"
        sources[filename] = test
        scope = _dict(namespace)
        scope["_sandbox_got"], scope["_sandbox_equal"] = got, equal
        try:
            _exec(_compile(test, filename, "exec"), scope)
            report("test", i, "ok")
        except _SystemExit as exit_:
            report("exit", exit_code(exit_), f"test {i}")
            return 1
        except _BaseException as err:
            report("test", i, "fail", *describe(err, sources))
    if spec["calls"]:
        from json import dumps
    for i, (name, args) in enumerate(spec["calls"]):
        try:
            value = find(namespace, name)(*args)
            try:
                text = dumps(value)
            except (TypeError, ValueError, RecursionError):
                text = dumps(_repr(value))
            report("call", i, "ok", text[:spec["file_size"]])
        except _SystemExit as exit_:
            report("exit", exit_code(exit_), f"call {i}")
            return 1
        except _BaseException as err:
            report("call", i, "fail", *describe(err, sources))
    report("done")
    flush()
    return 0


def execute(code: str, filename: str, namespace: dict, stage: str, report, sources: dict, script: bool):
    """Compiles and runs one stage; None to go on, else the exit status."""
    try:
        compiled = _compile(code, filename, "exec")
    except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte in the source
        report("error", "syntax" if stage == "code" else stage, *describe(err, sources))
        return 1
    try:
        _exec(compiled, namespace)
    except _SystemExit as exit_:
        code_ = exit_code(exit_)
        report("exit", code_, stage)
        if script and stage == "code":
            report("done")
            flush()
            return code_
        return 1
    except _BaseException as err:
        report("error", stage, *describe(err, sources))
        if script:
            print_traceback(err, sources)
        return 1
    if script and stage == "code":
        report("done")
        flush()
        return 0
    return None


def find(namespace: dict, name: str):
    """A function of the program: a top-level name, or a method of its ``Solution`` class
    (LeetCode-style programs)."""
    if name in namespace:
        return namespace[name]
    solution = namespace.get("Solution")
    if solution is not None and _hasattr(solution, name):
        try:
            return _getattr(solution(), name)
        except Exception:
            return None
    return None


def equal(value, expected) -> bool:
    """``value == expected`` for a rewritten ``assert value == expected``, refusing a value that
    holds an object whose ``__eq__`` is Python code where the expected value holds none: an
    object that says it equals anything must not pass a test."""
    if not trusted(value, 0) and trusted(expected, 0):
        return False
    return value == expected


def trusted(value, depth: int) -> bool:
    """Whether ``value`` and what its lists, tuples, sets and dicts hold compare with C code."""
    kind = _type(value)
    if _isinstance(_getattr(kind, "__eq__", None), _function) or _isinstance(_getattr(kind, "__ne__", None), _function):
        return False
    if depth > 20 or kind not in _CONTAINERS:
        return True
    items = _dict_items(value) if kind is _dict else value
    for item in items:
        if not trusted(item, depth + 1):
            return False
    return True


def got(value, source: str, message=None) -> str:
    """The message of a failed ``assert a == b`` (the tests are rewritten to call this)."""
    try:
        shown = _repr(value)
    except Exception:
        shown = "?"
    if _len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{source} -- got {shown}" + (f" ({message})" if message is not None else "")


def describe(err: BaseException, sources: dict) -> tuple[str, str, str]:
    """``(type, detail, refused)``: the exception's type name, the last line of its traceback
    (or the failing assert) and whether the sandbox raised it."""
    name = _type(err).__name__
    try:
        message = _str(err)
    except Exception:
        message = ""
    if _isinstance(err, SyntaxError):
        message = f"{err.msg} (line {err.lineno})"
    if _isinstance(err, _AssertionError):
        detail = message or failing_line(err, sources) or "assertion failed"
    else:
        detail = f"{'PermissionError' if _type(err) is Refused else name}: {message}" if message else name
    if _len(detail) > DETAIL_CHARS:
        detail = detail[:DETAIL_CHARS - 3] + "..."
    return name, detail, "refused" if _type(err) is Refused else ""


def failing_line(err: BaseException, sources: dict) -> str | None:
    """The source line of the innermost frame of a test or setup that raised ``err``."""
    tb, line = err.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in sources and filename != "solution.py":
            lines = _split(sources[filename], "\n")
            if 0 < tb.tb_lineno <= _len(lines):
                line = lines[tb.tb_lineno - 1].strip()
        tb = tb.tb_next
    return line


def exit_code(exit_: SystemExit) -> int:
    code = exit_.code
    if code is None:
        return 0
    if _type(code) is _int:
        return code
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def print_traceback(err: BaseException, sources: dict) -> None:
    """The traceback Python would print, with the program's lines (it has no file) and without
    the harness's frames; only its last line past a thousand frames (a deep recursion)."""
    try:
        import linecache
        import traceback

        for filename, code in sources.items():
            linecache.cache[filename] = (_len(code), None, code.splitlines(True), filename)
        depth, tb = 0, err.__traceback__
        while tb is not None and depth <= 1000:  # tb_next only: reading frames is what costs
            depth, tb = depth + 1, tb.tb_next
        if depth > 1000:
            sys.stderr.write("".join(traceback.format_exception_only(err)))
            return
        shown = traceback.TracebackException.from_exception(err, limit=-20)
        shown.stack = traceback.StackSummary.from_list([f for f in shown.stack if f.filename in sources])
        sys.stderr.write("".join(shown.format()))
    except Exception:
        pass


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


if __name__ == "__main__":
    main()
