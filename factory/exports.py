"""``factory export``: a dataset version in the formats training stacks read.

Conversations come from the ``messages`` column (or are built from ``instruction``,
``input`` and ``response``); preference pairs from ``prompt``, ``chosen`` and
``rejected``. Every export also writes ``export.json``: the version it came from (path
and manifest hash), the format and the row count.

When people have labelled rows of the version (``factory view``), the export also writes
``annotations.jsonl`` (the standing verdicts, sorted by part then index) and counts them in
``export.json``. A verdict's ``part``/``index`` and ``row_hash`` refer to the version's rows, not
to the exported records (the hash is of the version's row, all its columns). Every format writes
one record per row of ``data/``, in its order, so data row ``i`` is record ``i`` of the train file
(its line, or its list element); no format merges, splits, drops or reorders rows, each only
reshapes them (trl-dpo always, and every format but trl-sft for preference data, turns ``prompt``,
``chosen`` and ``rejected`` into its pair layout). Verdicts on ``rejected`` rows are about rows
no export holds.

Formats:
  trl-sft        train.jsonl: {"messages": [...]} (TRL's conversational format), or with
                 style=prompt-completion {"prompt": [user turns], "completion": [assistant turn]}
  trl-dpo        train.jsonl: {"prompt": [...], "chosen": [...], "rejected": [...]} (conversational
                 preference), or style=standard with plain strings
  openai         train.jsonl for OpenAI fine-tuning: {"messages": [...]}, or for preference
                 data {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}
  alpaca         train.json: [{"instruction", "input", "output"}] (preference: "chosen", "rejected")
  sharegpt       train.json: [{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}]
                 (preference: "chosen"/"rejected" messages beside the conversation)
  llama-factory  <name>.json in sharegpt layout, and dataset_info.json with its entry
  axolotl        train.jsonl ({"messages": [...]}) and axolotl.yaml, the `datasets:` section to
                 paste into an axolotl config (chat_template; for preference data, rl: dpo)

Tool use: conversations keep OpenAI's tool layout (an assistant turn with ``tool_calls``, each
call's ``arguments`` JSON text; a ``tool`` message per result with ``tool_call_id`` and ``name``),
and a row's ``tools`` column (JSON text of OpenAI function tools) goes beside its conversation,
written as OpenAI's function tools with only their standard keys (``name``, ``description``,
``parameters``: a definition's ``returns`` schema is for the simulator, not the model):
  trl-sft        "tools": JSON text (TRL's SFTTrainer json.loads a string ``tools`` column and hands
                 it to the chat template); arguments stay JSON text, so that ``datasets`` does not
                 unify different tools' arguments into one struct full of nulls
  openai         "tools": the definitions as objects; tool messages without ``name`` and an
                 assistant turn that only calls without ``content`` (OpenAI's training layout);
                 ``parallel_tool_calls`` is left to OpenAI's default (true), which parallel calls need
  sharegpt /     LLaMA-Factory's roles: a turn's calls are one "function_call" message whose value
  llama-factory  is the JSON of {"name", "arguments": {...}} (a list of them for parallel calls), the
                 results of one round one "observation" message (the result, or a JSON list of the
                 results of parallel calls: its converter wants human/observation and
                 gpt/function_call to alternate); "tools": JSON text; dataset_info.json maps the
                 ``tools`` column and the function_call/observation tags
  axolotl        "tools": a list of definitions with ``parameters`` as JSON text (axolotl's
                 chat_template strategy reads ``field_tools`` as a list and parses string
                 parameters and arguments; text keeps Arrow from merging schemas)
  alpaca         one instruction and one output: a row with tool calls cannot be written in it
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from .errors import FactoryError
from .llm.tool_format import clean_messages
from .tools import tools_of, tools_text

FORMATS = ("trl-sft", "trl-dpo", "openai", "alpaca", "sharegpt", "llama-factory", "axolotl")
TOOL_FORMATS = ("trl-sft", "openai", "sharegpt", "llama-factory", "axolotl")  # those that keep tool calls
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
ANNOTATIONS = "annotations.jsonl"


def conversations(table) -> list[list[dict]]:
    """Each row as a chat: its ``messages``, or user (instruction + input) then assistant (response)."""
    if "messages" in table.columns:
        return [[chat_message(m) for m in clean_messages(messages)] for messages in table["messages"].to_list()]
    missing = [c for c in ("instruction", "response") if c not in table.columns]
    if missing:
        raise FactoryError(f"the version has no `messages` column and no {', '.join(missing)} column to build "
                           "conversations from; export a version written with `output: {format: messages}`")
    chats = []
    for row in table.iter_rows(named=True):
        user = row["instruction"] + (f"\n\n{row['input']}" if isinstance(row.get("input"), str) and
                                     row["input"].strip() else "")
        chats.append([{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}])
    return chats


def chat_message(m: dict) -> dict:
    """A message with the keys of OpenAI's chat layout: role and content, an assistant's
    ``tool_calls`` (arguments as JSON text), a tool result's ``tool_call_id`` and ``name``."""
    out = {"role": m.get("role"), "content": m.get("content")}
    if m.get("tool_calls"):
        out["tool_calls"] = [_call(c) for c in m["tool_calls"]]
        if out["content"] is None:
            out["content"] = ""
    if m.get("role") == "tool":
        out.update({k: m[k] for k in ("tool_call_id", "name") if m.get(k) is not None})
    return out


def _call(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    out = {"id": call["id"]} if call.get("id") is not None else {}
    return {**out, "type": call.get("type") or "function", "function": {
        "name": function.get("name"),
        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {}, ensure_ascii=False)}}


def row_tools(table) -> list[list[dict] | None]:
    """Each row's tool definitions (OpenAI's function tools, standard keys only), or None for a
    row with none (no ``tools`` column, null, or an empty list)."""
    if "tools" not in table.columns:
        return [None] * table.height
    out = []
    for i, value in enumerate(table["tools"].to_list()):
        if value is None or (isinstance(value, str) and not value.strip()):
            out.append(None)
            continue
        try:
            tools = tools_of(value)
        except ValueError as err:
            raise FactoryError(f"row {i}: its `tools` value cannot be exported: {err}; write the row's tools as "
                               "JSON text of OpenAI function tools ([{\"type\": \"function\", \"function\": {...}}]) "
                               "or drop the `tools` column") from None
        standard = ("name", "description", "parameters")
        out.append([{"type": "function", "function": {k: t["function"][k] for k in standard}} for t in tools] or None)
    return out


def calls_tools(chat: list[dict]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in chat)


def _json_value(text):
    """JSON text as its value (a call's arguments, a tool's result); other text as it is."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _openai_message(m: dict) -> dict:
    # OpenAI's training examples: a tool message has no `name`, a turn that only calls has no content.
    if m["role"] == "tool":
        return {k: v for k, v in m.items() if k != "name"}
    if m.get("tool_calls") and not m.get("content"):
        return {k: v for k, v in m.items() if k != "content"}
    return m


def preference_rows(table) -> list[dict]:
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.columns]
    if missing:
        raise FactoryError(f"no {', '.join(missing)} column: this format needs preference pairs (make the version "
                           "with the `preference_pairs` step)")
    return table.select("prompt", "chosen", "rejected").to_dicts()


def is_preference(table) -> bool:
    return {"prompt", "chosen", "rejected"} <= set(table.columns)


def _split_last_assistant(chat: list[dict]) -> tuple[list[dict], dict]:
    if not chat or chat[-1]["role"] != "assistant":
        raise FactoryError("a conversation does not end with an assistant turn; it cannot be split into "
                           "prompt and completion")
    return chat[:-1], chat[-1]


def _texts(tools: list[list[dict] | None]) -> list[str | None]:
    return [t if t is None else tools_text(t) for t in tools]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _sharegpt(chat: list[dict], row: int = 0) -> list[dict]:
    """A chat in sharegpt layout; tool calls and results in LLaMA-Factory's function_call and
    observation roles (one message per round each, so that the roles alternate as it requires)."""
    out: list[dict] = []
    results: list[str] = []

    def flush():
        if results:
            value = results[0] if len(results) == 1 else \
                json.dumps([_json_value(r) for r in results], ensure_ascii=False)
            out.append({"from": "observation", "value": value})
            results.clear()

    for m in chat:
        if m["role"] == "tool":
            results.append(m.get("content") or "")
            continue
        flush()
        if m.get("tool_calls"):
            if m.get("content"):
                raise FactoryError(f"row {row}: an assistant turn has both text and tool calls, which sharegpt's "
                                   "function_call role cannot hold together; export it as trl-sft, openai or axolotl")
            calls = [{"name": c["function"]["name"], "arguments": _json_value(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            out.append({"from": "function_call",
                        "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)})
        else:
            out.append({"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]})
    flush()
    return out


def _with_tools(record: dict, tools) -> dict:
    return record if tools is None else {**record, "tools": tools}


def _axolotl_tools(tools: list[dict]) -> list[dict]:
    # parameters as JSON text: tools with different parameters would otherwise become one Arrow
    # struct of every tool's fields; axolotl's chat_template strategy parses string parameters.
    return [{"type": "function", "function": {**t["function"], "parameters": json.dumps(
        t["function"]["parameters"], ensure_ascii=False)}} for t in tools]


def _alpaca(chat: list[dict]) -> dict:
    system = [m["content"] for m in chat if m["role"] == "system"]
    users = [m for m in chat if m["role"] == "user"]
    assistants = [m for m in chat if m["role"] == "assistant"]
    if len(users) != 1 or len(assistants) != 1:
        raise FactoryError("alpaca holds one instruction and one output; a conversation has several turns "
                           "(use sharegpt or trl-sft)")
    row = {"instruction": users[0]["content"], "input": "", "output": assistants[0]["content"]}
    if system:
        row["system"] = system[0]
    return row


def why_empty(manifest: dict) -> str:
    """Where a version's rows went: the step that dropped the last of them and its main reasons."""
    from .store import step_label

    source = manifest.get("source") or {}
    for step in manifest.get("steps", []):
        if step.get("rows_in") and not step.get("rows_out"):
            reasons = sorted((step.get("dropped") or {}).items(), key=lambda kv: -kv[1])[:3]
            because = f": {', '.join(f'{r} {n}' for r, n in reasons)}" if reasons else ""
            return f"{step_label(step)} dropped the last {step['rows_in']} rows{because}"
    if source.get("dropped"):
        reasons = ", ".join(f"{r} {n}" for r, n in source["dropped"].items())
        return f"the source's {source.get('rows_read', 0)} rows were all set aside while reading: {reasons}"
    return "every row was dropped, or none was there"


def export(version_dir: str | Path, fmt: str, out_dir: str | Path, style: str | None = None) -> list[Path]:
    """Writes ``version_dir`` in format ``fmt`` into ``out_dir``; returns the files written."""
    from .store import MANIFEST, read_manifest, read_version

    if fmt not in FORMATS:
        raise FactoryError(f"unknown export format '{fmt}'; formats: {', '.join(FORMATS)}")
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    table = read_version(version_dir)
    if table.height == 0:
        raise FactoryError(f"{version_dir} has 0 rows, so there is nothing to export ({why_empty(manifest)}); "
                           f"see `factory inspect {version_dir}` for the drops per step and reason, and export a "
                           "version with rows. Nothing was written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{manifest['name']}_v{manifest['version']}".replace("-", "_")
    written: list[Path] = []
    preference = is_preference(table)

    if fmt == "trl-sft":
        if style not in (None, "messages", "prompt-completion"):
            raise FactoryError(f"trl-sft styles are messages and prompt-completion, not '{style}'")
        chats, tools = conversations(table), _texts(row_tools(table))
        if style == "prompt-completion":
            rows = []
            for chat, row_tools_text in zip(chats, tools):
                prompt, completion = _split_last_assistant(chat)
                rows.append(_with_tools({"prompt": prompt, "completion": [completion]}, row_tools_text))
        else:
            rows = [_with_tools({"messages": chat}, t) for chat, t in zip(chats, tools)]
        _write_jsonl(out / "train.jsonl", rows)
        written.append(out / "train.jsonl")
    elif fmt == "trl-dpo":
        if style not in (None, "conversational", "standard"):
            raise FactoryError(f"trl-dpo styles are conversational and standard, not '{style}'")
        pairs = preference_rows(table)
        rows = pairs if style == "standard" else [
            {"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
        _write_jsonl(out / "train.jsonl", rows)
        written.append(out / "train.jsonl")
    elif fmt == "openai":
        if preference:
            rows = [{"input": {"messages": [{"role": "user", "content": p["prompt"]}]},
                     "preferred_output": [{"role": "assistant", "content": p["chosen"]}],
                     "non_preferred_output": [{"role": "assistant", "content": p["rejected"]}]}
                    for p in preference_rows(table)]
        else:
            rows = [_with_tools({"messages": [_openai_message(m) for m in chat]}, tools)
                    for chat, tools in zip(conversations(table), row_tools(table))]
        _write_jsonl(out / "train.jsonl", rows)
        written.append(out / "train.jsonl")
    elif fmt == "alpaca":
        if preference:
            data = [{"instruction": p["prompt"], "input": "", "chosen": p["chosen"], "rejected": p["rejected"]}
                    for p in preference_rows(table)]
        else:
            chats = conversations(table)
            for i, chat in enumerate(chats):
                if calls_tools(chat):
                    raise FactoryError(f"row {i} calls tools, and alpaca (one instruction, one output) cannot hold "
                                       f"tool calls or their results; export the version as one of "
                                       f"{', '.join(TOOL_FORMATS)}. Nothing was written")
            data = [_alpaca(chat) for chat in chats]
        _write_json(out / "train.json", data)
        written.append(out / "train.json")
    elif fmt in ("sharegpt", "llama-factory"):
        with_tools = False
        if preference:
            data = [{"conversations": [{"from": "human", "value": p["prompt"]}],
                     "chosen": {"from": "gpt", "value": p["chosen"]},
                     "rejected": {"from": "gpt", "value": p["rejected"]}} for p in preference_rows(table)]
        else:
            chats, tools = conversations(table), row_tools(table)
            with_tools = any(t is not None for t in tools) or any(calls_tools(chat) for chat in chats)
            data = [_with_tools({"conversations": _sharegpt(chat, i)}, t)
                    for i, (chat, t) in enumerate(zip(chats, _texts(tools)))]
        file_name = "train.json" if fmt == "sharegpt" else f"{name}.json"
        _write_json(out / file_name, data)
        written.append(out / file_name)
        if fmt == "llama-factory":
            entry = {"file_name": file_name, "formatting": "sharegpt",
                     "columns": {"messages": "conversations"},
                     "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                              "assistant_tag": "gpt", "system_tag": "system"}}
            if preference:
                entry.update(ranking=True, columns={"messages": "conversations", "chosen": "chosen",
                                                    "rejected": "rejected"})
            elif with_tools:
                entry["columns"]["tools"] = "tools"
                entry["tags"].update(observation_tag="observation", function_tag="function_call")
            info_path = out / "dataset_info.json"
            info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
            info[name] = entry
            _write_json(info_path, info)
            written.append(info_path)
    elif fmt == "axolotl":
        data_path = (out / "train.jsonl").resolve()
        mappings = {"role": "role", "content": "content"}
        if preference:
            rows = [{"messages": [{"role": "user", "content": p["prompt"]}],
                     "chosen": {"role": "assistant", "content": p["chosen"]},
                     "rejected": {"role": "assistant", "content": p["rejected"]}} for p in preference_rows(table)]
            snippet = {"rl": "dpo", "datasets": [{"path": str(data_path), "ds_type": "json", "split": "train",
                                                  "type": "chat_template.default", "field_messages": "messages",
                                                  "field_chosen": "chosen", "field_rejected": "rejected",
                                                  "message_property_mappings": mappings}]}
        else:
            tools = row_tools(table)
            rows = [_with_tools({"messages": chat}, t if t is None else _axolotl_tools(t))
                    for chat, t in zip(conversations(table), tools)]
            dataset = {"path": str(data_path), "ds_type": "json", "split": "train", "type": "chat_template",
                       "field_messages": "messages", "message_property_mappings": mappings,
                       "roles_to_train": ["assistant"]}
            if any(t is not None for t in tools):
                dataset["field_tools"] = "tools"  # the chat template gets each row's tools
            snippet = {"datasets": [dataset]}
        _write_jsonl(out / "train.jsonl", rows)
        note = ("# rows carry their tools (field_tools) and the assistant's tool_calls: use a chat_template that "
                "renders tools\n" if "field_tools" in snippet["datasets"][0] else "")
        (out / "axolotl.yaml").write_text(f"# {manifest['name']} v{manifest['version']}: paste into your axolotl "
                                          f"config\n{note}" + yaml.safe_dump(snippet, sort_keys=False),
                                          encoding="utf-8")
        written += [out / "train.jsonl", out / "axolotl.yaml"]
    record = {"format": fmt, "style": style, "source": str(version_dir.resolve()), "name": manifest["name"],
              "version": manifest["version"], "rows": table.height,
              "manifest_sha256": hashlib.sha256((version_dir / MANIFEST).read_bytes()).hexdigest(),
              "files": [p.name for p in written]}
    annotations = write_annotations(version_dir, out)
    if annotations is not None:
        record["annotations"] = annotations
        written.append(out / ANNOTATIONS)
    _write_json(out / "export.json", record)
    return written


def write_annotations(version_dir: Path, out: Path) -> dict | None:
    """Writes the version's standing verdicts to ``out/annotations.jsonl``; returns their counts for
    ``export.json``, or None (and no file) when people have labelled no row."""
    from .annotations import read_verdicts, verdict_counts, verdicts_jsonl

    verdicts = read_verdicts(version_dir)
    path = out / ANNOTATIONS
    if not verdicts:
        # A file left by an earlier export into this folder would pass for this version's verdicts.
        path.unlink(missing_ok=True)
        return None
    path.write_text(verdicts_jsonl(verdicts), encoding="utf-8")
    return {"file": ANNOTATIONS, **verdict_counts(verdicts)}
