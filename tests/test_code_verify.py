"""``verify: {method: code}`` and the sandbox under it: test formats, verdicts, hostile programs.

Every program here runs for real in the sandbox (a process each, ~30 ms); the hostile ones
are given short limits. Each hostile program must fail its row with its exact reason while
the files outside its folder, this process and the machine stay as they were.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import polars as pl
import pytest

from factory.code_tests import code_blocks, outputs_match, read_suite, response_code
from factory.errors import FactoryError
from factory.recipe import load_recipe
from factory.sandbox import Limits, Program, default_workers, run_many, run_python
from factory.steps.context import StepContext
from factory.steps.drops import DROP, DROP_DETAIL
from factory.steps.verify import Verify, VerifyConfig

ROOT = os.geteuid() == 0
COLUMNS = ["correct", "tests_passed", "tests_total", "code_result", "code_detail"]


def verify(rows: list[dict], **options) -> pl.DataFrame:
    step = Verify(VerifyConfig(method="code", **options))
    return step.process(pl.DataFrame(rows), StepContext())


def verdicts(out: pl.DataFrame) -> dict:
    return {row["id"]: tuple(row[c] for c in COLUMNS) for row in out.iter_rows(named=True)}


def fenced(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


# -- the test formats ----------------------------------------------------------------------------

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]


def test_mbpp_asserts_count_each_test_and_say_what_a_failing_one_got():
    rows = [
        {"id": "right", "response": fenced("def add(a, b):\n    return a + b"), "test_list": ADD_TESTS},
        {"id": "half", "response": fenced("def add(a, b):\n    return a + b if a > 0 else 7"), "test_list": ADD_TESTS},
        {"id": "wrong", "response": fenced("def add(a, b):\n    return a - b"), "test_list": ADD_TESTS},
        {"id": "raises", "response": fenced("def add(a, b):\n    return a / 0"), "test_list": ADD_TESTS},
        {"id": "syntax", "response": fenced("def add(a, b)\n    return a + b"), "test_list": ADD_TESTS},
        {"id": "empty", "response": "I cannot solve this.", "test_list": ADD_TESTS},
    ]
    out = verify(rows, tests="test_list")
    assert verdicts(out) == {
        "right": (True, 3, 3, "passed", None),
        "half": (False, 2, 3, "wrong_answer", "test 3: assert add(-1, 1) == 0 -- got 7"),
        "wrong": (False, 0, 3, "wrong_answer", "test 1: assert add(1, 2) == 3 -- got -1"),
        "raises": (False, 0, 3, "runtime_error", "test 1: ZeroDivisionError: division by zero"),
        "syntax": (False, 0, 3, "syntax_error", "SyntaxError: expected ':' (line 1)"),
        "empty": (False, 0, 3, "syntax_error", "SyntaxError: invalid syntax (line 1)"),
    }
    assert out[DROP].to_list() == [None] * 6  # labelled, not dropped, without drop_incorrect


def test_mbpp_setup_code_and_test_imports_run_before_the_tests():
    rows = [{"id": "r", "response": fenced("def area(r):\n    return math.pi * r * r"),
             "test_list": ["assert math.isclose(area(2), SCALE * math.pi)"], "test_setup_code": "SCALE = 4",
             "test_imports": ["import math"]}]
    out = verify(rows, tests="test_list", setup_code=["test_imports", "test_setup_code"])
    assert verdicts(out) == {"r": (True, 1, 1, "passed", None)}


HUMANEVAL_TEST = '''

METADATA = {"author": "jt", "dataset": "test"}


def check(candidate):
    assert candidate([1, 2, 3]) == 6
    assert candidate([]) == 0
    assert abs(candidate([0.5, 0.25]) - 0.75) < 1e-9
'''


def test_humaneval_check_runs_against_the_entry_point_of_the_block_that_defines_it():
    example_after = fenced("def total(xs):\n    return sum(xs)") + "\nExample:\n```python\nprint(total([1]))\n```"
    rows = [
        {"id": "right", "response": example_after},
        {"id": "wrong", "response": fenced("def total(xs):\n    return len(xs)")},
        {"id": "float", "response": fenced("def total(xs):\n    return int(sum(xs)) if xs and xs[0] < 1 else sum(xs)")},
        {"id": "misnamed", "response": fenced("def summed(xs):\n    return sum(xs)")},
    ]
    for row in rows:
        row.update(test=HUMANEVAL_TEST, entry_point="total")
    out = verify(rows, tests="test", entry_point="entry_point")
    assert verdicts(out) == {
        "right": (True, 1, 1, "passed", None),
        "wrong": (False, 0, 1, "wrong_answer", "assert candidate([1, 2, 3]) == 6 -- got 3"),
        "float": (False, 0, 1, "wrong_answer", "assert abs(candidate([0.5, 0.25]) - 0.75) < 1e-09"),
        "misnamed": (False, 0, 1, "no_entry_point", "the code defines no function 'total'"),
    }
    # a missing entry point says nothing about the tests' verdict: always dropped
    assert out[DROP].to_list() == [None, None, None, "no_entry_point"]
    assert out[DROP_DETAIL].to_list()[3] == "the code defines no function 'total'"


def test_apps_stdin_stdout_pairs_compare_lines_tokens_and_floats():
    io = json.dumps({"inputs": ["1 2\n", "10 20\n", "0.1 0.2\n"], "outputs": ["3\n", "30\n", "0.3\n"]})
    rows = [
        {"id": "right", "response": fenced("a, b = map(float, input().split())\nprint(f'{a + b:g}  ')\n\n")},
        {"id": "int", "response": fenced("a, b = input().split()\nprint(int(a) + int(b))")},
        {"id": "crash", "response": fenced("import sys\nprint('partial')\nsys.exit(3)")},
        {"id": "main", "response": fenced("def main():\n    a, b = map(float, open(0).read().split())\n"
                                          "    print(round(a + b, 9))\n\nif __name__ == '__main__':\n    main()")},
    ]
    for row in rows:
        row["input_output"] = io
    out = verify(rows, tests="input_output")
    assert verdicts(out) == {
        "right": (True, 3, 3, "passed", None),
        "int": (False, 2, 3, "runtime_error", "test 3: ValueError: invalid literal for int() with base 10: '0.1'"),
        "crash": (False, 0, 3, "runtime_error", "test 1: exit code 3"),
        "main": (False, 1, 3, "wrong_answer", "test 1: line 1: expected '3', got '3.0'"),
    }


def test_apps_fn_name_calls_the_function_or_the_solution_method():
    io = json.dumps({"fn_name": "twice", "inputs": [[1], [[1, 2]]], "outputs": [[2], [[1, 2, 1, 2]]]})
    rows = [
        {"id": "function", "response": fenced("def twice(x):\n    return x * 2")},
        {"id": "leetcode", "response": fenced("class Solution:\n    def twice(self, x):\n        return x + x")},
        {"id": "tuple", "response": fenced("def twice(x):\n    return tuple(x * 2) if isinstance(x, list) else 2 * x")},
        {"id": "wrong", "response": fenced("def twice(x):\n    return x")},
        {"id": "absent", "response": fenced("def thrice(x):\n    return x * 3")},
    ]
    for row in rows:
        row["input_output"] = io
    out = verify(rows, tests="input_output")
    assert verdicts(out) == {
        "function": (True, 2, 2, "passed", None),
        "leetcode": (True, 2, 2, "passed", None),
        "tuple": (True, 2, 2, "passed", None),
        "wrong": (False, 0, 2, "wrong_answer", "test 1: twice(1) returned 1, expected 2"),
        "absent": (False, 0, 2, "no_entry_point", "the code defines no function 'twice'"),
    }


def test_codecontests_public_and_private_tests_add_up():
    rows = [{"id": "r", "response": fenced("print(int(input()) ** 2)"),
             "public_tests": {"input": ["2\n"], "output": ["4\n"]},
             "private_tests": {"input": ["3\n", "5\n"], "output": ["9\n", "24\n"]}}]
    out = verify(rows, tests=["public_tests", "private_tests"])
    assert verdicts(out) == {"r": (False, 2, 3, "wrong_answer", "test 3: line 1: expected '24', got '25'")}
    out = verify(rows, tests=["public_tests", "private_tests"], max_tests=2)
    assert verdicts(out) == {"r": (True, 2, 2, "passed", None)}


def test_drop_incorrect_drops_with_the_result_and_its_detail():
    rows = [{"id": "ok", "response": fenced("def add(a, b):\n    return a + b"), "test_list": ADD_TESTS},
            {"id": "bad", "response": fenced("def add(a, b):\n    return a * b"), "test_list": ADD_TESTS}]
    out = verify(rows, tests="test_list", drop_incorrect=True)
    assert out[DROP].to_list() == [None, "wrong_answer"]
    assert out[DROP_DETAIL].to_list() == [None, "test 1: assert add(1, 2) == 3 -- got 2"]


def test_rows_whose_tests_cannot_run_are_dropped_with_the_reason():
    good = fenced("def add(a, b):\n    return a + b")
    rows = [
        {"id": "none", "response": good, "tests": None, "entry_point": None},
        {"id": "empty", "response": good, "tests": "[]", "entry_point": None},
        {"id": "unparsable", "response": good, "tests": "assert add(1, 2) == = 3", "entry_point": None},
        {"id": "bad_json", "response": good, "tests": '{"inputs": [1', "entry_point": None},
        {"id": "lengths", "response": good, "tests": '{"inputs": ["1"], "outputs": []}', "entry_point": None},
        {"id": "no_entry_column", "response": good, "tests": HUMANEVAL_TEST, "entry_point": None},
        {"id": "bad_name", "response": good, "tests": HUMANEVAL_TEST, "entry_point": "not a name"},
    ]
    out = verify(rows, tests="tests", entry_point="entry_point")
    assert dict(zip(out["id"], zip(out[DROP], out[DROP_DETAIL]))) == {
        "none": ("no_tests", "the row has no tests"),
        "empty": ("no_tests", "the row has no tests"),
        "unparsable": ("bad_tests", "the tests does not parse: invalid syntax (line 1)"),
        "bad_json": ("bad_tests", "the tests are not valid JSON: Expecting ',' delimiter: line 1 column 14 (char 13)"),
        "lengths": ("bad_tests", "io tests need as many outputs as inputs, got 1 inputs and 0 outputs"),
        "no_entry_column": ("no_entry_point", "check(candidate) tests need the function to pass them: set "
                                              "`entry_point:` to the column that names it"),
        "bad_name": ("no_entry_point", "the entry point 'not a name' is not a Python name"),
    }
    assert out["correct"].to_list() == [False] * 7


def test_an_object_that_equals_everything_does_not_pass():
    rows = [{"id": "always", "response": fenced("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                                "def add(a, b):\n    return Yes()"), "test_list": ADD_TESTS},
            {"id": "nested", "response": fenced("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                                "def add(a, b):\n    return [Yes()]"),
             "test_list": ["assert add(1, 2) == [3]"]}]
    out = verify(rows, tests="test_list")
    assert out["code_result"].to_list() == ["wrong_answer", "wrong_answer"]
    assert out["code_detail"][1].startswith("assert add(1, 2) == [3] -- got [<solution.Yes object at")


# -- hostile programs ---------------------------------------------------------------------------------

def test_hostile_programs_fail_their_row_with_the_reason_and_touch_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside_tmp = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    outside_home = Path.home() / f"sandbox-escape-{uuid.uuid4().hex}"
    programs = {
        "infinite_loop": ("def f():\n    while True:\n        pass", "timeout", "over the 1 s time limit"),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()\ndef f():\n    return 1", "forbidden",
                      "PermissionError: sandbox: starting processes is not allowed"),
        "allocation": ("def f():\n    return len(bytearray(50 * 10**9))", "memory",
                       "MemoryError (over the memory limit)"),
        "write_tmp": (f"def f():\n    open({str(outside_tmp)!r}, 'w').write('x')\n    return 1", "forbidden",
                      f"PermissionError: sandbox: writing outside the run's folder is not allowed: {outside_tmp}"),
        "write_home": (f"def f():\n    open({str(outside_home)!r}, 'w').write('x')\n    return 1", "forbidden",
                       f"PermissionError: sandbox: writing outside the run's folder is not allowed: {outside_home}"),
        "socket": ("import socket\ndef f():\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n    return 1",
                   "forbidden", "PermissionError: sandbox: network access is not allowed"),
        "print_gigabytes": ("def f():\n    while True:\n        print('x' * 10**6)", "output_limit",
                            "printed over 64 KB"),
        "delete": (f"import os\ndef f():\n    os.remove({str(victim)!r})\n    return 1", "forbidden",
                   f"PermissionError: sandbox: changing files outside the run's folder is not allowed: {victim}"),
        "exit_early": ("import sys\nsys.exit(0)", "exited_early", "the program exited (code 0) before its tests ran"),
        "exit_in_test": ("import sys\ndef f():\n    sys.exit(0)", "exited_early",
                         "the program exited (code 0) during test 0, before its tests ran to their end"),
        "os_exit": ("import os\nos._exit(0)", "exited_early",
                    "the process ended (exit code 0) before its tests ran to their end"),
        "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "forbidden",
                        "PermissionError: sandbox: signalling other processes is not allowed"),
        "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "forbidden",
                         "PermissionError: sandbox: resource.setrlimit is not allowed"),
    }
    rows = [{"id": name, "response": fenced(code), "test_list": ["assert f() == 1"]}
            for name, (code, _, _) in programs.items()]
    out = verify(rows, tests="test_list", time_limit=1, output_limit_kb=64)
    assert dict(zip(out["id"], zip(out["code_result"], out["code_detail"]))) == \
        {name: (result, detail) for name, (_, result, detail) in programs.items()}
    assert out["correct"].to_list() == [False] * len(programs)
    assert not outside_tmp.exists() and not outside_home.exists()
    assert victim.read_text() == "keep me"


def test_the_harness_s_audit_hook_refuses_each_event_with_its_message(tmp_path):
    """Each audit event Python 3.11 raises for what a test must not do (the events table of the
    docs, checked by running each), refused with a message that says what."""
    victim = tmp_path / "victim"
    victim.write_text("x")
    out = str(tmp_path / "out")
    cases = {
        "os.fork": ("import os; os.fork()", "starting processes is not allowed"),
        "os.system": ("import os; os.system('true')", "starting processes is not allowed"),
        "os.exec": ("import os; os.execv('/bin/true', ['true'])", "starting processes is not allowed"),
        "os.posix_spawn": ("import os; os.posix_spawn('/bin/true', ['true'], {})", "starting processes is not allowed"),
        "os.spawn": ("import os; os.spawnv(os.P_WAIT, '/bin/true', ['true'])", "starting processes is not allowed"),
        "subprocess (import of _posixsubprocess)": ("import subprocess", "starting processes is not allowed"),
        "os.kill": ("import os; os.kill(1, 0)", "signalling other processes is not allowed"),
        "os.killpg": ("import os; os.killpg(1, 0)", "signalling other processes is not allowed"),
        "socket.connect": ("import socket; socket.socket().connect(('127.0.0.1', 9))", "network access is not allowed"),
        "socket.bind": ("import socket; socket.socket().bind(('127.0.0.1', 0))", "network access is not allowed"),
        "socket.sendto": ("import socket; socket.socket(type=socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
                          "network access is not allowed"),
        "ctypes.dlopen": ("import ctypes; ctypes.CDLL('libc.so.6')", "ctypes is not allowed"),
        "ctypes.dlsym": ("import ctypes; ctypes.pythonapi.Py_GetVersion", "ctypes is not allowed"),
        "ctypes.cdata": ("import ctypes; ctypes.c_int.from_address(id(1))", "ctypes is not allowed"),
        "open (write)": (f"open({out!r}, 'w')", f"writing outside the run's folder is not allowed: {out}"),
        "open (os.open)": (f"import os; os.open({out!r}, os.O_WRONLY | os.O_CREAT)",
                           f"writing outside the run's folder is not allowed: {out}"),
        "open (a folder)": ("import os; os.open('/tmp', os.O_RDONLY)",
                            "opening a folder outside the run's folder (writes relative to it would escape) is not "
                            "allowed: /tmp"),
        "open (through ..)": (f"open('..' + {out!r}, 'a')",
                              f"writing outside the run's folder is not allowed: ..{out}"),
        "os.remove": (f"import os; os.remove({str(victim)!r})",
                      f"changing files outside the run's folder is not allowed: {victim}"),
        "os.rmdir": (f"import os; os.rmdir({str(tmp_path)!r})",
                     f"changing files outside the run's folder is not allowed: {tmp_path}"),
        "os.mkdir": (f"import os; os.mkdir({out!r})", f"changing files outside the run's folder is not allowed: {out}"),
        "os.chmod": (f"import os; os.chmod({str(victim)!r}, 0o777)",
                     f"changing files outside the run's folder is not allowed: {victim}"),
        "os.utime": (f"import os; os.utime({str(victim)!r})",
                     f"changing files outside the run's folder is not allowed: {victim}"),
        "os.truncate": (f"import os; os.truncate({str(victim)!r}, 0)",
                        f"changing files outside the run's folder is not allowed: {victim}"),
        "os.rename": (f"import os; os.rename({str(victim)!r}, 'mine')",
                      "moving or linking files across the run's folder is not allowed: mine"),
        "os.link": (f"import os; os.link({str(victim)!r}, 'mine')",
                    "moving or linking files across the run's folder is not allowed: mine"),
        "os.symlink": (f"import os; os.symlink('/etc', {out!r})",
                       f"moving or linking files across the run's folder is not allowed: {out}"),
        "shutil.rmtree": (f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                          f"changing files outside the run's folder is not allowed: {tmp_path}"),
        "resource.setrlimit": ("import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))",
                               "resource.setrlimit is not allowed"),
        "resource.prlimit": ("import resource; resource.prlimit(0, resource.RLIMIT_CORE)",
                             "resource.prlimit is not allowed"),
        "gc.get_objects": ("import gc; gc.get_objects()", "gc.get_objects is not allowed"),
        "gc.get_referrers": ("import gc; gc.get_referrers(1)", "gc.get_referrers is not allowed"),
        "sub-interpreters": ("import _xxsubinterpreters", "sub-interpreters is not allowed"),
    }
    results = run_many([Program(code) for code, _ in cases.values()], Limits(time=10))
    got = {name: (r.first("error") or ("", "", "", r.stderr[-200:], ""))[3] for name, r in zip(cases, results)}
    assert got == {name: f"PermissionError: sandbox: {message}" for name, (_, message) in cases.items()}
    assert {r.first("error")[4] for r in results} == {"refused"}
    assert victim.read_text() == "x" and not Path(out).exists()


def test_what_a_test_may_do_still_works():
    code = """
import collections, dataclasses, json, socket, tempfile, threading, os
Point = collections.namedtuple("Point", "x y")          # reads its caller's frame
@dataclasses.dataclass
class Box:
    size: int
with open("mine.txt", "w") as f:                        # its own folder
    f.write("x")
os.mkdir("sub"); os.rename("mine.txt", "sub/mine.txt"); os.remove("sub/mine.txt"); os.rmdir("sub")
with tempfile.NamedTemporaryFile("w") as f:             # TMPDIR is its folder
    f.write("y")
a, b = socket.socketpair(); a.send(b"z")                # no network, but a pair
done = []
t = threading.Thread(target=done.append, args=(1,)); t.start(); t.join()
open(1, "w", closefd=False).write("fd1 ")
with open(os.devnull, "w") as f:
    f.write("nothing")
print(Point(1, 2), Box(3), b.recv(1), done, json.dumps([1]), __name__)
if __name__ == "__main__":
    print("main")
"""
    result = run_python(code)
    assert (result.outcome, result.stderr, result.records) == ("exited", "", [("done",)])
    assert result.stdout == "fd1 Point(x=1, y=2) Box(size=3) b'z' [1] [1] __main__\nmain\n"
    # with tests, the program is a module, not a script: its main block does not run
    result = run_python(code + "\ndef f():\n    return 1", tests=["assert f() == 1"])
    assert result.stdout == "fd1 Point(x=1, y=2) Box(size=3) b'z' [1] [1] solution\n"
    assert result.records == [("test", "0", "ok"), ("done",)]


@pytest.mark.skipif(not ROOT, reason="the unprivileged user is what a root factory runs programs as")
def test_without_the_audit_hook_the_kernel_still_confines_the_program(tmp_path):
    """The first layer alone (a program that got past the hook with native code): the
    unprivileged user, the hard limits, the network namespace and the process group."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    home_file = Path.home() / f"sandbox-escape-{uuid.uuid4().hex}"
    bare = Limits(time=1, audit_hook=False, memory_mb=512, output_bytes=1 << 20, processes=32)
    programs = {
        "user": "import os; print(os.getuid(), os.getgid(), os.getsid(0) == os.getpgid(0) == os.getpid())",
        "limits": "import resource as r\nprint([r.getrlimit(x) for x in (r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_FSIZE, "
                  "r.RLIMIT_NPROC, r.RLIMIT_CORE)])",
        "raise_limits": "import resource as r; r.setrlimit(r.RLIMIT_AS, (-1, -1))",
        "write_home": f"open({str(home_file)!r}, 'w')",
        "delete": f"import os; os.remove({str(victim)!r})",
        "kill_parent": "import os; os.kill(os.getppid(), 9)",
        "network": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    }
    results = dict(zip(programs, run_many([Program(code) for code in programs.values()], bare)))
    error = {name: (r.first("error") or ("",) * 4)[3] for name, r in results.items()}
    assert results["user"].stdout == "65534 65534 True\n"  # nobody, leading its own session and group
    mib = 512 << 20
    # CPU: a second above the 1 s wall limit (soft), the hard limit one more, so the wall clock ends a busy loop
    assert results["limits"].stdout == f"[({mib}, {mib}), (2, 3), ({1 << 20}, {1 << 20}), (32, 32), (0, 0)]\n"
    assert error["raise_limits"] == "ValueError: not allowed to raise maximum limit"
    assert error["write_home"] == f"PermissionError: [Errno 13] Permission denied: '{home_file}'"
    assert error["delete"] == f"PermissionError: [Errno 13] Permission denied: '{victim}'"
    assert error["kill_parent"] == "PermissionError: [Errno 1] Operation not permitted"
    if not any("network not isolated" in note for note in results["network"].notes):
        assert error["network"] == "OSError: [Errno 101] Network is unreachable"
    assert results["fork_bomb"].outcome == "timeout"
    for result in results.values():  # nothing of any run's process group is left alive
        assert live_members(result.pid) == []
    assert victim.read_text() == "keep" and not home_file.exists()


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not dead (a killed orphan stays a zombie until init
    reaps it, which takes its time on a busy machine)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def test_the_runs_of_a_batch_overlap_over_the_workers():
    programs = [Program("import time\ntime.sleep(1.5)")] * 4
    results = run_many(programs, Limits(time=30), workers=4)
    assert [r.outcome for r in results] == ["exited"] * 4
    assert max(r.started for r in results) < min(r.ended for r in results)  # all four ran at once
    assert default_workers() == len(os.sched_getaffinity(0))


def test_run_python_reads_stdin_writes_stdout_and_cleans_its_folder():
    result = run_python("import os\nprint(input()[::-1], os.getcwd() == os.environ['HOME'])\nprint(os.getcwd())",
                        stdin="abc")
    assert result.outcome == "exited" and result.exit_code == 0
    first, folder = result.stdout.splitlines()
    assert first == "cba True"
    assert not os.path.exists(folder)


# -- reading responses and comparing outputs --------------------------------------------------------

def test_the_code_is_the_last_python_block_that_defines_the_tested_function():
    reply = ("First try:\n```python\ndef f():\n    return 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\n"
             "Usage:\n```python\nprint(f())\n```\nOutput:\n```\n2\n```")
    assert response_code(reply, ("f",)) == "def f():\n    return 2"
    assert response_code(reply) == "print(f())"
    assert response_code("def f():\n    return 3\n") == "def f():\n    return 3"
    assert response_code("Cut short:\n```python\ndef f():\n    return") == "def f():\n    return"
    assert response_code("```\nx = 1\n```") == "x = 1"
    assert code_blocks("````python\n```inner```\n````") == [("python", "```inner```")]


def test_outputs_compare_lines_then_tokens_then_floats():
    assert outputs_match("3  \n\n", "3\n") == (True, None)
    assert outputs_match("1 2\n3", "1\n2 3\n") == (True, None)
    assert outputs_match("0.3000001\n", "0.3\n", tolerance=1e-6) == (True, None)
    assert outputs_match("1000001\n", "1000000\n", tolerance=1e-6) == \
        (False, "line 1: expected '1000000', got '1000001'")
    assert outputs_match("1\n", "1\n2\n") == (False, "expected 2 lines, got 1 (first missing: '2')")


def test_auto_tells_the_formats_apart_by_their_shape():
    assert read_suite([["assert f(1) == 1"]]).kind == "checks"
    assert read_suite(["assert f(1) == 1\nassert f(2) == 2"]).checks == (
        "assert _sandbox_equal((_sandbox_value := f(1)), 1), _sandbox_got(_sandbox_value, 'assert f(1) == 1')",
        "assert _sandbox_equal((_sandbox_value := f(2)), 2), _sandbox_got(_sandbox_value, 'assert f(2) == 2')")
    assert read_suite([HUMANEVAL_TEST], entry_point="total").function == "total"
    assert read_suite(['{"inputs": ["1"], "outputs": ["1"]}']).kind == "io"
    assert read_suite([{"input": ["1"], "output": ["1"]}]).cases == (("1", "1"),)
    assert read_suite(['{"fn_name": "f", "inputs": [[1]], "outputs": [1]}']).cases == (((1,), 1),)


# -- the recipe ---------------------------------------------------------------------------------------

def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_recipe_naming_a_missing_column_or_no_tests_fails_before_any_model_loads(write_recipe, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", [{"response": "x = 1", "test_list": ["assert x == 1"]}])
    path = write_recipe(f"name: c\nsource: {{path: {rows}}}\nsteps:\n  - verify: {{method: code, tests: test_lst}}\n")
    with pytest.raises(FactoryError) as err:
        load_recipe(path)
    assert "steps[0].verify: needs column 'test_lst', which neither the source (response, test_list) nor an " \
           "earlier step produces" in str(err.value)
    assert "did you mean 'test_list'?" in str(err.value)
    path = write_recipe(f"name: c\nsource: {{path: {rows}}}\nsteps:\n  - verify: {{method: code}}\n")
    with pytest.raises(FactoryError) as err:
        load_recipe(path)
    assert "steps[0].verify.tests: method `code` needs `tests`: the column with each row's tests" in str(err.value)
    path = write_recipe(f"name: c\nsource: {{path: {rows}}}\nsteps:\n"
                        f"  - verify: {{method: numeric, tests: test_list}}\n")
    with pytest.raises(FactoryError) as err:
        load_recipe(path)
    assert "`tests` is read only by `method: code` (the method is `numeric`)" in str(err.value)


def test_a_recipe_run_labels_rows_and_select_keeps_the_correct_ones(write_recipe, tmp_path):
    from factory.build import run_recipe
    from factory.cache import Cache
    from factory.driver import Driver
    from factory.store import read_version

    task = "Write add(a, b)."
    rows = write_rows(tmp_path / "rows.jsonl", [
        {"id": "good", "instruction": task, "response": fenced("def add(a, b):\n    return a + b"),
         "test_list": ADD_TESTS},
        {"id": "bad", "instruction": task, "response": fenced("def add(a, b):\n    return 0"), "test_list": ADD_TESTS},
        {"id": "untested", "instruction": task, "response": fenced("def add(a, b):\n    return a + b"),
         "test_list": []}])
    path = write_recipe(f"name: code\nsource: {{path: {rows}}}\nsteps:\n"
                        f"  - verify: {{method: code, tests: test_list}}\n"
                        f"  - select: {{verifier: programmatic}}\n")
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    kept = read_version(version)
    assert kept["id"].to_list() == ["good"]
    assert kept["tests_passed"].to_list() == [3]
    step = manifest["steps"][0]
    assert step["report"]["code_results"] == {"passed": 1, "wrong_answer": 1, "no_tests": 1}
