"""``tool_calls``: trajectories in which the model calls tools, the calls run, and it answers (APIGen-style checks).

For each row's request (``instruction``) the model gets the tools the row offers (its ``tools``
column, from ``tool_queries`` or a dataset's own, else the step's ``tools:``) and answers with
calls or with text (:mod:`factory.tools`: natively on a server that takes ``tools``, else a JSON
reply held to a schema built from the tools). Each call runs: its implementation in the sandbox
(``implementations:``, a Python file), or a model simulates its result (``simulator_llm``; the
row's ``simulated`` column names those tools). The results go back as ``tool`` messages and the
model goes on, until it answers in text; after ``max_calls`` calls it must answer.

Three checks, each a drop reason with the turn in its detail: ``format`` (the reply is not a
call or an answer, a call names no tool offered, or its arguments fail the tool's JSON Schema:
jsonschema's message), ``execution`` (the implementation raised or passed the time limit, or a
simulated result is not JSON), ``semantic`` (with ``semantic: true``, a judge, its own
``judge_llm``, finds that the calls and results do not answer the request). With ``kind`` from
``tool_queries``, a request that needs tools and gets none is ``no_call``, one that needs none
and gets calls is ``unneeded_call``; a call made again with the same arguments (its result is
already in the chat: a model going round in circles) is ``repeated_call``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import tools as T
from ..llm import tool_format as F
from ..config import option
from ..errors import ParseError
from ..hashing import fingerprint
from ..llm.base import Completion, GenerationParams, Request
from ..llm.requests import ToLLM
from ..llm.schema import extract_json, read_reply, schema_text
from .drops import TRUNCATED, InvalidRow, dropped
from .llm_step import LLMStep, LLMStepConfig
from .truncation import continuations, truncation_detail

SIMULATOR, JUDGE = "simulator", "judge"  # the step's other models (LLMSession.extras, ToLLM)
NEEDS_CALLS = ("single", "multiple", "parallel")  # kinds of request (tool_queries) that need calls
VERDICT = {"type": "object", "properties": {"reason": {"type": "string"}, "answers": {"type": "boolean"}},
           "required": ["reason", "answers"], "additionalProperties": False}


@dataclass
class ToolCallsConfig(LLMStepConfig):
    tools: str | list | None = option(None, help="The tools: a JSON or YAML file of OpenAI function definitions "
                                                 "(relative to the recipe) or the list inline. A row's `tools` "
                                                 "column (tool_queries', or a dataset's own) is used instead when set.")
    implementations: str | None = option(None, help="A Python file with one function per tool name (keyword "
                                                    "arguments as the tool's parameters; loaded from this path only), "
                                                    "run in the sandbox for each call.")
    simulate: Literal["auto", "missing", "all", "none"] = option(
        "auto", help="Which calls a model simulates (`simulator_llm`). `auto`: with `implementations`, every tool of "
                     "`tools` must have a function there (a recipe error otherwise) and only tools from elsewhere (a "
                     "row's own) are simulated; without it, all are. `missing`: any tool without a function. `all`, "
                     "or `none` (such a call fails its row as `execution`).")
    simulator_llm: dict | None = option(None, help="The backend that simulates tool results, merged over the "
                                                   "recipe's `llm` (default: the recipe's model).")
    simulator_template: str | None = option(None, help="The simulator's prompt (Jinja; variables: tool, arguments, "
                                                       "request).")
    max_calls: int = option(4, help="Most calls per row; after them the model must answer in text.", min=1, max=64)
    max_parallel: int = option(4, help="Most calls in one reply (parallel calls).", min=1, max=32)
    timeout: float = option(5.0, help="Seconds one implementation call may run.", min=0.1, max=3600)
    network: bool = option(False, help="Let implementations reach the network (tools that call real APIs).")
    semantic: bool = option(False, help="Ask a judge whether the calls and their results answer the request; "
                                        "rows it says no to are dropped as `semantic`.")
    judge_llm: dict | None = option(None, help="The semantic judge's backend, merged over the recipe's `llm`.")
    judge_template: str | None = option(None, help="The semantic judge's prompt (Jinja; variables: request, "
                                                   "calls, answer).")
    expect_calls: bool = option(True, help="With a `kind` column: drop requests that need tools but got no call "
                                           "(`no_call`) and those that need none but got calls (`unneeded_call`).")
    column: str = option("instruction", help="The user's request.")
    tools_column: str = option("tools", help="Where a row's tools are read from, and written to (JSON text).")
    kind_column: str = option("kind", help="The kind of request (single, multiple, parallel, none), if any.")
    output_column: str = option("messages", help="Where the trajectory goes, in OpenAI's tool format.")
    max_tokens: int = option(512, help="Most tokens per reply.", min=1)

    def validate(self):
        if self.template is not None:
            return [("tool_calls has no `template`: the model sees the request and the tools", "template",
                     "put instructions in `system:`")]
        return []


@dataclass
class Trajectory:
    """One row's run: its messages so far, the calls waiting for results, and how it ended."""

    row: dict
    tools: list[dict]
    messages: list[dict]
    kind: str | None = None
    calls: int = 0
    pending: list[tuple[str, str, dict]] = field(default_factory=list)  # (id, name, arguments)
    simulated: set = field(default_factory=set)
    answer: str | None = None
    failed: dict | None = None

    @property
    def going(self) -> bool:
        return self.failed is None and self.answer is None

    def fail(self, step, reason: str, turn: int, detail: str, reply: str | None = None) -> None:
        so_far = {step.config.output_column: self.messages, "calls": self.calls}
        self.failed = dropped({**self.row, **so_far}, reason, f"turn {turn}: {detail}", reply)


class ToolCalls(LLMStep):
    """Tool-use trajectories: calls, their results (run or simulated), and the answer, checked.

    Requires: ``instruction`` (the request) and tools (the ``tools`` column or option).
    Produces: ``messages`` (OpenAI tool format), ``tools`` (the definitions offered, JSON text),
    ``response`` (the final answer), ``calls``, ``simulated`` (tools a model simulated). Drops:
    ``format``, ``execution``, ``semantic``, ``no_call``, ``unneeded_call``, ``repeated_call``,
    ``truncated``.

    Example:
        - tool_calls: {tools: tools.json, implementations: tools.py, max_calls: 4, semantic: true}
    """

    name = "tool_calls"
    Config = ToolCallsConfig
    templates = {"simulator_template": "tool_simulator", "judge_template": "tool_judge"}

    @property
    def extra_llms(self) -> dict[str, str]:  # only the models the options use
        c = self.config
        return {**({SIMULATOR: "simulator_llm"} if c.simulate != "none" else {}),
                **({JUDGE: "judge_llm"} if c.semantic else {})}

    def check(self):
        return super().check() + tool_option_problems(self) + implementation_problems(self)

    def requires(self):
        return [self.config.column]

    def produces(self):
        c = self.config
        return [c.output_column, c.tools_column, "response", "calls", "simulated"]

    def fingerprint(self) -> str:  # what the files say, not only their names
        return fingerprint([super().fingerprint(), files_text(self)])

    def exchange(self, rows, ctx):
        runs = [start(self, row) for row in rows]
        impl = implementations(self)
        for turn in range(1, self.config.max_calls + 2):
            going = [t for t in runs if t.going]
            if not going:
                break
            replies = yield [request(self, t) for t in going]
            for t, completion in zip(going, replies):
                take_reply(self, t, completion, turn)
            calling = [t for t in going if t.going and t.pending]
            if calling:
                yield from run_calls(self, calling, impl, turn)
        if self.config.semantic:
            yield from judge(self, [t for t in runs if t.failed is None])
        return [finished(self, t) for t in runs]


# -- tools and implementations from the options -------------------------------------------------

def step_tools(step) -> list[dict] | None:
    """The ``tools`` option's definitions (None when unset). Raises ToolsError."""
    value = step.config.tools
    if value is None:
        return None
    if isinstance(value, list):
        return T.check_tools(value, f"{step.label}.tools")
    path = file_path(step, value)
    stat = path.stat() if path.is_file() else None
    return _load_tools(str(path), stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=32)
def _load_tools(path: str, version) -> list[dict]:  # read again when the file changes
    return T.load_tools(path)


def file_path(step, value: str) -> Path:
    """A file option's path, looked for as sources are: the working folder, the recipe's, the project's."""
    from ..sources import resolve_path

    return resolve_path(value, step.base_dir) or step.path(value)


def tool_option_problems(step) -> list[tuple]:
    try:
        step_tools(step)
    except T.ToolsError as err:
        return [(str(err), "tools", "fix the tool definitions (OpenAI function format: name, description, "
                                    "parameters as JSON Schema)")]
    return []


def implementation_problems(step) -> list[tuple]:
    c = step.config
    if c.implementations is None:
        return []
    path = file_path(step, c.implementations)
    if path.suffix != ".py" or not path.is_file():
        return [(f"implementations file '{c.implementations}' is not a Python file that exists (looked at {path})",
                 "implementations", "give the path of a .py file, relative to the recipe")]
    try:
        impl = T.Implementations(path, c.timeout, network=c.network)
        problem = impl.check_imports()
        tools = step_tools(step) or []
    except T.ToolsError as err:
        return [(str(err), "implementations", "fix the file so that it runs")]
    if problem:
        return [(problem, "implementations", "fix the file so that it loads on its own (standard library and "
                                             "installed packages only)")]
    missing = [t["function"]["name"] for t in tools if not impl.has(t["function"]["name"])]
    if missing and c.simulate in ("auto", "none"):
        where = ""
        if isinstance(c.tools, str):
            lines = T.tool_lines(file_path(step, c.tools))
            where = " (defined at " + ", ".join(f"{c.tools}:{lines[n]}" for n in missing if n in lines) + ")"
        return [(f"{path} has no function for the tool(s) {', '.join(missing)}{where}", "implementations",
                 f"add `def {missing[0]}(...)` (keyword arguments as its parameters) to {c.implementations}, or set "
                 "`simulate: missing` to have a model simulate the tools without one")]
    return []


def implementations(step) -> T.Implementations | None:
    c = step.config
    return T.Implementations(file_path(step, c.implementations), c.timeout, network=c.network) \
        if c.implementations else None


def files_text(step) -> list[str]:
    c = step.config
    out = []
    for value in (c.tools if isinstance(c.tools, str) else None, getattr(c, "implementations", None)):
        path = file_path(step, value) if value else None
        out.append(path.read_text(encoding="utf-8") if path is not None and path.is_file() else "")
    return out


# -- the rounds -------------------------------------------------------------------------------

def start(step: ToolCalls, row: dict) -> Trajectory:
    c = step.config
    messages = [{"role": "system", "content": c.system}] if c.system else []
    kind = row.get(c.kind_column) if isinstance(row.get(c.kind_column), str) else None
    t = Trajectory(row, [], messages, kind)
    try:
        messages.append({"role": "user", "content": step.text(row, c.column)})
        value = row.get(c.tools_column)
        t.tools = T.tools_of(value) if value not in (None, "", []) else step_tools(step) or []
        if not t.tools:
            raise InvalidRow(f"no tools: the row has no '{c.tools_column}' and the step no `tools:`")
    except (InvalidRow, ValueError, T.ToolsError) as err:
        t.failed = dropped(row, "invalid_input", str(err))
    return t


def request(step: ToolCalls, t: Trajectory) -> Request:
    c = step.config
    left = c.max_calls - t.calls
    schema = F.reply_schema(t.tools, calls=left > 0, max_parallel=min(c.max_parallel, max(left, 1)))
    params = dataclasses.replace(step.generation_params(), n=1, json_schema=schema_text(schema),
                                 tools=T.tools_text(t.tools), tool_choice="auto" if left > 0 else "none",
                                 continuations=continuations(c))
    return Request(list(t.messages), params)


def take_reply(step: ToolCalls, t: Trajectory, completion: Completion, turn: int) -> None:
    """The model's reply of ``turn``: calls (checked, waiting to run), the answer, or the row dropped."""
    c = step.config
    if completion.error is not None:
        return t.fail(step, completion.error_reason, turn, completion.error)
    text = completion.texts[0]
    if completion.cut(0):
        return t.fail(step, TRUNCATED, turn, truncation_detail(step), text)
    try:
        reply = F.read_reply(text)
    except ParseError as err:
        return t.fail(step, F.FORMAT, turn, str(err), text)
    if reply.answer is not None:
        if c.expect_calls and t.kind in NEEDS_CALLS and t.calls == 0:
            return t.fail(step, "no_call", turn, f"the request needs tools ({t.kind}) and the model answered "
                                                 "without calling any", text)
        t.answer = reply.answer
        t.messages.append({"role": "assistant", "content": reply.answer})
        return None
    offered = T.by_name(t.tools)
    for k, call in enumerate(reply.calls):
        problem = T.call_problem(call, offered)
        if problem:
            return t.fail(step, F.FORMAT, turn, f"call {k}: {problem}", text)
    if len(reply.calls) > c.max_calls - t.calls:
        return t.fail(step, F.FORMAT, turn, f"{len(reply.calls)} calls where {c.max_calls - t.calls} were left "
                                            f"(max_calls: {c.max_calls})", text)
    made = [(m["function"]["name"], _canonical(m["function"]["arguments"])) for m in
            (call for msg in t.messages for call in msg.get("tool_calls") or ())]
    for k, call in enumerate(reply.calls):
        key = (call["name"], _canonical(call["arguments"]))
        if key in made:
            return t.fail(step, "repeated_call", turn, f"call {k}: {call['name']} with the same arguments was "
                                                       "already made: its result is in the chat", text)
        made.append(key)
    if c.expect_calls and t.kind == "none":
        return t.fail(step, "unneeded_call", turn, "the request needs no tool and the model called "
                                                   f"{', '.join(call['name'] for call in reply.calls)}", text)
    seed = f"{step.seed}:{step.index}:{t.row.get(c.column)}"
    ids = [F.call_id(seed, turn, k) for k in range(len(reply.calls))]
    t.messages.append(F.assistant_message(reply.calls, ids))
    t.pending = [(i, call["name"], call["arguments"]) for i, call in zip(ids, reply.calls)]
    return None


def _canonical(arguments) -> str:
    """A call's arguments (an object, or OpenAI's JSON text) as text that equal arguments share."""
    return json.dumps(F.arguments_value(arguments), sort_keys=True)


def run_calls(step: ToolCalls, runs: list[Trajectory], impl, turn: int):
    """Runs (or simulates) every pending call of ``runs``; their results become ``tool`` messages."""
    c = step.config
    real, fake = [], []
    for t in runs:
        for k, (_, name, arguments) in enumerate(t.pending):
            if impl is not None and impl.has(name) and c.simulate != "all":
                real.append((t, k))
            elif c.simulate == "none":
                where = f"in {c.implementations}" if impl is not None else "(no implementations file)"
                t.fail(step, T.EXECUTION, turn, f"{name} has no implementation {where} and simulate is none")
            else:
                fake.append((t, k))
    results: dict[tuple[int, int], str] = {}
    if real:
        for (t, k), result in zip(real, impl.run([t.pending[k][1:] for t, k in real])):
            if result.ok:
                results[id(t), k] = result.content
            elif t.failed is None:
                t.fail(step, T.EXECUTION, turn, f"call {k}: {result.error}")
    fake = [(t, k) for t, k in fake if t.failed is None]
    if fake:
        replies = yield ToLLM(SIMULATOR, [simulator_request(step, t, k) for t, k in fake])
        for (t, k), completion in zip(fake, replies):
            content = simulated_result(completion)
            if content is None:
                if t.failed is None:
                    t.fail(step, T.EXECUTION, turn, f"call {k}: the simulated result of {t.pending[k][1]} is not "
                                                    "JSON" + (f" ({completion.error})" if completion.error else ""),
                           completion.texts[0] if completion.texts else None)
                continue
            results[id(t), k] = content
            t.simulated.add(t.pending[k][1])
    for t in runs:
        if t.failed is None:
            t.messages += [F.tool_message(i, name, results[id(t), k]) for k, (i, name, _) in enumerate(t.pending)]
            t.calls += len(t.pending)
        t.pending = []


def simulator_request(step: ToolCalls, t: Trajectory, k: int) -> Request:
    _, name, arguments = t.pending[k]
    tool = T.by_name(t.tools)[name]
    prompt = step.render(t.row, "simulator_template", tool=tool, arguments=json.dumps(arguments, ensure_ascii=False),
                         request=t.messages[0 if t.messages[0]["role"] == "user" else 1]["content"])
    returns = tool.get("returns")
    params = GenerationParams(temperature=0.0, max_tokens=256, max_tokens_option="max_tokens",
                              json_schema=schema_text(returns) if isinstance(returns, dict) else None)
    return Request([{"role": "user", "content": prompt}], params)


def simulated_result(completion: Completion) -> str | None:
    """A simulated result as compact JSON text, or None when the reply holds no JSON (or failed)."""
    if completion.error is not None or not completion.texts or completion.cut(0):
        return None
    try:
        value = extract_json(completion.texts[0])
    except ParseError:
        return None
    return json.dumps(value, ensure_ascii=False)


def judge(step: ToolCalls, runs: list[Trajectory]):
    """The semantic check: a judge reads each trajectory and says whether it answers the request."""
    if not runs:
        return
    params = GenerationParams(temperature=0.0, max_tokens=256, json_schema=schema_text(VERDICT))
    asks = []
    for t in runs:
        calls = [{"name": m["tool_calls"][j]["function"]["name"], "arguments": m["tool_calls"][j]["function"]
                  ["arguments"], "result": next((r["content"] for r in t.messages if r.get("tool_call_id") ==
                                                 m["tool_calls"][j]["id"]), "")}
                 for m in t.messages if m.get("tool_calls") for j in range(len(m["tool_calls"]))]
        prompt = step.render(t.row, "judge_template", request=t.row.get(step.config.column),
                             calls=calls, answer=t.answer)
        asks.append(Request([{"role": "user", "content": prompt}], params))
    replies = yield ToLLM(JUDGE, asks)
    for t, completion in zip(runs, replies):
        turn = t.calls + 1
        if completion.error is not None:
            t.fail(step, completion.error_reason, turn, f"the semantic judge's request: {completion.error}")
            continue
        try:
            verdict = read_reply(completion.texts[0], VERDICT)
        except ParseError as err:
            t.fail(step, "parse_error", turn, f"the semantic judge's reply: {err}", completion.texts[0])
            continue
        if not verdict["answers"]:
            t.fail(step, T.SEMANTIC, turn, f"the judge: {verdict['reason']}", completion.texts[0])


def finished(step: ToolCalls, t: Trajectory) -> dict:
    if t.failed is not None:
        return t.failed
    c = step.config
    return {**t.row, c.output_column: t.messages, c.tools_column: T.tools_text(t.tools), "response": t.answer,
            "calls": t.calls, "simulated": sorted(t.simulated)}
