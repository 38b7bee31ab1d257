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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from .errors import FactoryError

FORMATS = ("trl-sft", "trl-dpo", "openai", "alpaca", "sharegpt", "llama-factory", "axolotl")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
ANNOTATIONS = "annotations.jsonl"


def conversations(table) -> list[list[dict]]:
    """Each row as a chat: its ``messages``, or user (instruction + input) then assistant (response)."""
    if "messages" in table.columns:
        return [[{"role": m["role"], "content": m["content"]} for m in messages or []]
                for messages in table["messages"].to_list()]
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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _sharegpt(chat: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in chat]


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
        chats = conversations(table)
        if style == "prompt-completion":
            rows = []
            for chat in chats:
                prompt, completion = _split_last_assistant(chat)
                rows.append({"prompt": prompt, "completion": [completion]})
        else:
            rows = [{"messages": chat} for chat in chats]
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
            rows = [{"messages": chat} for chat in conversations(table)]
        _write_jsonl(out / "train.jsonl", rows)
        written.append(out / "train.jsonl")
    elif fmt == "alpaca":
        if preference:
            data = [{"instruction": p["prompt"], "input": "", "chosen": p["chosen"], "rejected": p["rejected"]}
                    for p in preference_rows(table)]
        else:
            data = [_alpaca(chat) for chat in conversations(table)]
        _write_json(out / "train.json", data)
        written.append(out / "train.json")
    elif fmt in ("sharegpt", "llama-factory"):
        if preference:
            data = [{"conversations": [{"from": "human", "value": p["prompt"]}],
                     "chosen": {"from": "gpt", "value": p["chosen"]},
                     "rejected": {"from": "gpt", "value": p["rejected"]}} for p in preference_rows(table)]
        else:
            data = [{"conversations": _sharegpt(chat)} for chat in conversations(table)]
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
            rows = [{"messages": chat} for chat in conversations(table)]
            snippet = {"datasets": [{"path": str(data_path), "ds_type": "json", "split": "train",
                                     "type": "chat_template", "field_messages": "messages",
                                     "message_property_mappings": mappings, "roles_to_train": ["assistant"]}]}
        _write_jsonl(out / "train.jsonl", rows)
        (out / "axolotl.yaml").write_text(f"# {manifest['name']} v{manifest['version']}: paste into your axolotl "
                                          f"config\n" + yaml.safe_dump(snippet, sort_keys=False), encoding="utf-8")
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
