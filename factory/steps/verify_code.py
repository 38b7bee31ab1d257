"""``verify: {method: code}``: each response's code run against its row's tests, in the sandbox.

The ``verify`` step hands its batch here when its method is ``code``. Each row's tests are read
(:mod:`factory.code_tests`), its response's code is taken from its fenced block, and the
programs of the whole batch run in parallel in the sandbox (:mod:`factory.sandbox`), one
process per row (per stdin/stdout case for ``io`` tests). Every row gets:

* the verdict in the verify ``output_column`` (``correct``: the column every verify method
  fills, so ``select: {verifier: programmatic}`` and ``factory evolve`` read it the same way);
* ``tests_passed`` and ``tests_total``;
* ``code_result``: ``passed``, or why not (:data:`RESULTS`), and ``code_detail``: the failing
  assert with what it got, expected against got, or the last line of the traceback.

Rows whose tests cannot run (:data:`ALWAYS_DROPPED`) are dropped with the reason whatever
``drop_incorrect`` says: they say nothing about the response.
"""

from __future__ import annotations

from collections import Counter

import polars as pl

from ..code_tests import BadTests, Suite, call_matches, outputs_match, read_suite, response_code
from ..sandbox import Limits, Program, RunResult, run_many
from .drops import DROP, DROP_DETAIL

RESULT, DETAIL, PASSED, TOTAL = "code_result", "code_detail", "tests_passed", "tests_total"
RESULTS = {
    "passed": "every test passed",
    "wrong_answer": "a test failed: an assert, or stdout / a return value that differs from the expected one",
    "runtime_error": "the code raised (or died from a signal, or exited non-zero on stdin/stdout tests)",
    "syntax_error": "the code does not compile",
    "timeout": "past the time limit (wall clock) or its CPU seconds",
    "memory": "MemoryError: past the memory limit",
    "output_limit": "printed more than the output limit",
    "forbidden": "the sandbox refused an operation (a process, a socket, a write outside its folder...)",
    "exited_early": "the program exited (sys.exit, os._exit) before its tests ran to their end",
    "no_code": "the response holds no code",
}
ALWAYS_DROPPED = ("no_tests", "bad_tests", "no_entry_point")


def code_requires(config) -> list[str]:
    """The columns ``verify: {method: code}`` reads."""
    return list(dict.fromkeys([config.response, *names(config.tests), *names(config.entry_point),
                               *names(config.setup_code)]))


def names(value) -> list[str]:
    """Column options as a list (a recipe gives lists; ``VerifyConfig(tests="x")`` a name)."""
    return [value] if isinstance(value, str) else list(value or [])


def code_produces(config) -> list[str]:
    return [config.output_column, PASSED, TOTAL, RESULT, DETAIL]


def code_problems(config) -> list[tuple[str, str | None, str]]:
    """What is wrong with a verify config's code options, as ``(message, key, fix)``."""
    code = config.method == "code"
    if code and not config.tests:
        return [("method `code` needs `tests`: the column with each row's tests", "tests",
                 "add e.g. `tests: test_list` (MBPP), `tests: test` with `entry_point: entry_point` (HumanEval), "
                 "`tests: input_output` (APPS)")]
    if code and config.test_format == "humaneval" and not config.entry_point:
        return [("`test_format: humaneval` calls check(<entry point>): it needs `entry_point`", "entry_point",
                 "add `entry_point: entry_point` (the column naming the function)")]
    if not code:
        given = [key for key in ("tests", "entry_point") if getattr(config, key)] + \
            (["setup_code"] if config.setup_code else [])
        if given:
            return [(f"`{given[0]}` is read only by `method: code` (the method is `{config.method}`)", given[0],
                     "set `method: code`, or remove it")]
    return []


def limits_of(config) -> Limits:
    return Limits(time=config.time_limit, memory_mb=config.memory_limit_mb, output_bytes=config.output_limit_kb << 10)


def verify_code(batch: pl.DataFrame, config, ctx=None) -> pl.DataFrame:
    """Runs each row's code against its tests; see the module's docstring for the columns."""
    c = config
    verdicts: list[tuple[str, str | None, int, int] | None] = [None] * batch.height
    suites: dict[int, Suite] = {}
    programs: list[Program] = []
    owners: list[int] = []
    columns = {name: batch[name].to_list() for name in code_requires(c)}
    for i in range(batch.height):
        try:
            suite = read_suite([columns[name][i] for name in names(c.tests)], c.test_format,
                               columns[c.entry_point][i] if c.entry_point else None,
                               [columns[name][i] for name in names(c.setup_code)], c.max_tests)
        except BadTests as bad:
            verdicts[i] = (bad.reason, bad.detail, 0, 0)
            continue
        reply = columns[c.response][i]
        code = response_code(reply if isinstance(reply, str) else None, suite.names)
        if not code.strip():
            verdicts[i] = ("no_code", "the response holds no code", 0, suite.total)
            continue
        suites[i] = suite
        for program in programs_of(code, suite):
            programs.append(program)
            owners.append(i)
    runs: dict[int, list[RunResult]] = {}
    for owner, run in zip(owners, run_many(programs, limits_of(c), c.workers)):
        runs.setdefault(owner, []).append(run)
    for i, suite in suites.items():
        result, detail, passed = judge(suite, runs[i], c)
        verdicts[i] = (result, detail, passed, suite.total)
    if ctx is not None:
        ctx.report["code_results"] = dict(Counter(v[0] for v in verdicts))
        notes = Counter(note for rs in runs.values() for run in rs for note in run.notes)
        if notes:
            ctx.report["sandbox_notes"] = dict(notes)
    return with_verdicts(batch, verdicts, c)


def programs_of(code: str, suite: Suite) -> list[Program]:
    """The runs a row needs: one for checks or calls, one per case for stdin/stdout tests."""
    if suite.kind == "io":
        return [Program(code, stdin=stdin, setup=suite.setup) for stdin, _ in suite.cases]
    if suite.kind == "calls":
        return [Program(code, setup=suite.setup, calls=tuple((suite.function, args) for args, _ in suite.cases),
                        entry_point=suite.function)]
    return [Program(code, setup=suite.setup, tests=suite.checks, entry_point=suite.function)]


def judge(suite: Suite, runs: list[RunResult], config) -> tuple[str, str | None, int]:
    """``(result, detail, tests passed)`` of a row from its runs: the first failing test's
    result (in the tests' order), or ``passed``."""
    if suite.kind == "io":
        outcomes = [case_result(run, expected, config) for run, (_, expected) in zip(runs, suite.cases)]
        passed = sum(result == "passed" for result, _ in outcomes)
        for k, (result, detail) in enumerate(outcomes):
            if result != "passed":
                return result, (f"test {k + 1}: {detail}" if len(outcomes) > 1 else detail), passed
        return "passed", None, passed
    run = runs[0]
    early = before_tests(run)
    if early is not None:
        return early[0], early[1], 0
    kind = "test" if suite.kind == "checks" else "call"
    records = {int(r[1]): r for r in run.of(kind) if len(r) > 2}
    passed, first = 0, None
    for k in range(suite.total):
        record = records.get(k)
        if record is None:
            first = first or stopped(run, config)
            break
        if record[2] == "ok" and kind == "call":
            ok, detail = call_matches(record[3] if len(record) > 3 else "", suite.cases[k][1])
            verdict = None if ok else ("wrong_answer", f"{suite.function}{call_args(suite.cases[k][0])} {detail}")
        else:
            verdict = None if record[2] == "ok" else failure(*record[3:6])
        if verdict is None:
            passed += 1
        elif first is None:
            first = (verdict[0], f"test {k + 1}: {verdict[1]}" if suite.total > 1 else verdict[1])
    return (first[0], first[1], passed) if first else ("passed", None, passed)


def before_tests(run: RunResult) -> tuple[str, str] | None:
    """Why no test ran: the code does not compile, raised, exited, or lacks the entry point."""
    error = run.first("error")
    if error is not None:
        stage, rest = error[1], error[2:]
        if stage == "syntax":
            return "syntax_error", rest[1] if len(rest) > 1 else "SyntaxError"
        result, detail = failure(*rest)
        return result, (f"setup code: {detail}" if stage == "setup" else detail)
    missing = run.first("no_entry_point")
    if missing is not None:
        return "no_entry_point", f"the code defines no function {missing[1]!r}"
    exit_ = run.first("exit")
    if exit_ is not None and exit_[2] in ("setup", "code"):
        return "exited_early", f"the program exited (code {exit_[1]}) before its tests ran"
    return None


def stopped(run: RunResult, config) -> tuple[str, str]:
    """Why the run ended before its next test finished."""
    if run.outcome == "timeout":
        return "timeout", (f"over {limits_of(config).cpu_seconds} s of CPU time" if run.signal == "SIGXCPU"
                           else f"over the {config.time_limit:g} s time limit")
    if run.outcome == "output_limit":
        return "output_limit", f"printed over {config.output_limit_kb} KB"
    exit_ = run.first("exit")
    if exit_ is not None:
        return "exited_early", (f"the program exited (code {exit_[1]}) during {exit_[2]}, before its tests ran to "
                                "their end")
    if run.outcome == "signal":
        return "runtime_error", f"killed by {run.signal}"
    return "exited_early", f"the process ended (exit code {run.exit_code}) before its tests ran to their end"


def failure(type_name: str = "", detail: str = "", refused: str = "") -> tuple[str, str]:
    """The result of a test or stage that raised ``type_name``."""
    if refused:
        return "forbidden", detail
    if type_name == "MemoryError":
        return "memory", f"MemoryError (over the memory limit){': ' + detail if detail != 'MemoryError' else ''}"
    if type_name == "AssertionError":
        return "wrong_answer", detail
    return "runtime_error", detail or type_name


def case_result(run: RunResult, expected: str, config) -> tuple[str, str | None]:
    """The result of one stdin/stdout case."""
    error = run.first("error")
    if error is not None and error[1] == "syntax":
        return "syntax_error", error[3] if len(error) > 3 else "SyntaxError"
    if error is not None:
        return failure(*error[2:5])
    if run.outcome != "exited":
        return stopped(run, config)
    if run.exit_code:
        last = run.stderr.strip().splitlines()[-1:] or [""]
        return "runtime_error", f"exit code {run.exit_code}" + (f": {last[0][:200]}" if last[0] else "")
    ok, detail = outputs_match(run.stdout, expected, config.tolerance)
    return ("passed", None) if ok else ("wrong_answer", detail)


def call_args(args: tuple) -> str:
    text = "(" + ", ".join(repr(a) for a in args) + ")"
    return text if len(text) <= 80 else text[:77] + "...)"


def with_verdicts(batch: pl.DataFrame, verdicts: list, config) -> pl.DataFrame:
    results = [v[0] for v in verdicts]
    out = batch.with_columns(
        pl.Series(config.output_column, [r == "passed" for r in results], dtype=pl.Boolean),
        pl.Series(PASSED, [v[2] for v in verdicts], dtype=pl.Int64),
        pl.Series(TOTAL, [v[3] for v in verdicts], dtype=pl.Int64),
        pl.Series(RESULT, results, dtype=pl.String),
        pl.Series(DETAIL, [v[1] for v in verdicts], dtype=pl.String))
    dropped = [r in ALWAYS_DROPPED or (config.drop_incorrect and r != "passed") for r in results]
    return out.with_columns(
        pl.Series(DROP, [r if d else None for r, d in zip(results, dropped)], dtype=pl.String),
        pl.Series(DROP_DETAIL, [v[1] if d else None for v, d in zip(verdicts, dropped)], dtype=pl.String))
