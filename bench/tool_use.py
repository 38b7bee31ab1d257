"""Tool-use data from the bundled recipe: how many trajectories pass each check, on the embedded model and on a scripted stronger model.

``recipes/tool_use.yaml`` runs twice in one process: on the embedded SmolLM2-135M (CPU) and on a
scripted model that plays a capable tool caller (it writes requests for the tools it is shown and
answers them with the right calls, read from the results), with a known share of the faults
real models make injected: a unit outside the tool's enum (the ``format`` check must drop it), a
call that raises in the implementation (``execution``), an answer that misstates the result
(``semantic``; the scripted judge compares the answer with the results). The checks should keep
exactly the trajectories without a fault. Then the scripted run's rows are exported for TRL and
one step of TRL's SFTTrainer runs on them (the embedded model, exported as a plain folder, with a
chat template that renders tools).

Usage:
    python bench/tool_use.py [--rows 40] [--skip-embedded] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.build import run_recipe  # noqa: E402
from factory.cache import Cache  # noqa: E402
from factory.driver import Driver  # noqa: E402
from factory.llm import ScriptedBackend  # noqa: E402
from factory.recipe import load_recipe  # noqa: E402
from factory.steps.tool_queries import KINDS  # noqa: E402
from factory.store import read_version  # noqa: E402

CHECKS = ("format", "execution", "semantic")
BEFORE = ("truncated", "backend_error", "parse_error", "no_call", "unneeded_call", "repeated_call")
COUNTRIES = ["Japan", "Kenya", "Peru", "Norway", "Vietnam", "Ghana", "Chile", "Iceland"]
CONVERSIONS = [(26.2, "mi", "km", "miles", "kilometres"), (150, "lb", "kg", "pounds", "kilograms"),
               (37, "celsius", "fahrenheit", "degrees Celsius", "degrees Fahrenheit"), (2.5, "l", "cup", "litres",
                                                                                      "cups")]


# A wrong call of each tool that its JSON Schema refuses (format), and one that fits the schema but
# that the implementation refuses (execution).
FAULTS = {
    "format": {"calculator": lambda i: {"expr": f"{i} + 1"},
               "convert_units": lambda i: {"value": i, "from_unit": "kilometers", "to_unit": "mi"},
               "date_helper": lambda i: {"operation": "weekday", "date": f"March {1 + i % 28}th"},
               "lookup": lambda i: {"operation": "fetch", "country": "Japan"}},
    "execution": {"calculator": lambda i: {"expression": f"{i} / 0"},
                  "convert_units": lambda i: {"value": i, "from_unit": "celsius", "to_unit": "kg"},
                  "date_helper": lambda i: {"operation": "weekday", "date": "2023-02-30"},
                  "lookup": lambda i: {"operation": "get", "country": "Atlantis", "fields": ["capital"]}},
}


def single(tool: str, i: int) -> tuple[str, dict]:
    """A request that one call of ``tool`` answers, and that call (varied by ``i``)."""
    if tool == "calculator":
        a, b, c = 12.5 + i, 4 + i % 3, 3 * i
        return f"What is {a} times {b} plus {c}?", {"expression": f"{a} * {b} + {c}"}
    if tool == "convert_units":
        value, frm, to, frm_name, to_name = CONVERSIONS[i % len(CONVERSIONS)]
        return f"How many {to_name} is {value} {frm_name}?", {"value": value, "from_unit": frm, "to_unit": to}
    if tool == "date_helper":
        start, end = f"2024-0{1 + i % 5}-1{i % 10}", f"2024-0{6 + i % 3}-0{1 + i % 9}"
        return f"How many days are there between {start} and {end}?", {
            "operation": "days_between", "date": start, "other_date": end}
    country = COUNTRIES[i % len(COUNTRIES)]
    return f"What is the capital of {country}?", {"operation": "get", "country": country, "fields": ["capital"]}


class StrongModel:
    """A scripted model that writes requests for the tools it is shown and calls them rightly; every
    ``fault_every``-th request gets one fault, cycling format, execution, semantic."""

    def __init__(self, fault_every: int = 4):
        self.plans: dict[str, dict] = {}
        self.fault_every = fault_every

    def __call__(self, config):
        return ScriptedBackend(config, reply_fn=self.reply)

    def reply(self, conversation, sample):
        first = conversation[0]["content"]
        if first.startswith("Write one message that a user"):
            return self.write_request(first)
        if first.startswith("An assistant answered a user's request"):
            return self.judge(first)
        return self.act(conversation)

    def write_request(self, prompt: str) -> str:
        tools = re.findall(r"^- (\w+): ", prompt, re.M)
        kind = next(k for k, text in KINDS.items() if text in prompt)
        i = len(self.plans)
        fault = CHECKS[(i // self.fault_every) % 3] if i % self.fault_every == self.fault_every - 1 else None
        if kind == "none":
            text, rounds = f"Any tips for keeping a travel budget, for trip number {i}?", []
        else:
            (t1, c1), (t2, c2) = [(t, single(t, i + k)) for k, t in enumerate(tools[:2])]
            if kind == "single":
                text, rounds = c1[0], [[(t1, c1[1])]]
            elif kind == "parallel":
                text, rounds = f"{c1[0]} Also: {c2[0][0].lower()}{c2[0][1:]}", [[(t1, c1[1]), (t2, c2[1])]]
            else:
                text, rounds = f"First: {c1[0]} Then: {c2[0]}", [[(t1, c1[1])], [(t2, c2[1])]]
            if fault in FAULTS:
                rounds[0][0] = (t1, FAULTS[fault][t1](i))
        text = f"{text} (Request {i}.)"  # each request its own, past the `exact` filter
        self.plans[text] = {"rounds": rounds, "fault": fault if rounds else None}  # no fault to make without calls
        return text

    def act(self, conversation) -> str:
        request = next(m["content"] for m in conversation if m["role"] == "user")
        plan = self.plans[request]
        if conversation[-1]["content"].startswith("That reply is not valid"):
            return conversation[-2]["content"]  # sent back to fix: this model says the same again
        done = sum(m["role"] == "assistant" for m in conversation)
        if done < len(plan["rounds"]):
            return json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in plan["rounds"][done]]})
        results = [line.split("): ", 1)[1] for m in conversation if m["role"] == "user"
                   for line in m["content"].splitlines() if line.startswith("Tool result (")]
        if not results:
            return json.dumps({"answer": "Keep a daily limit, track each expense, and book early."})
        answer = "; ".join(results)
        if plan["fault"] == "semantic":
            answer = "I could not find that out."
        return json.dumps({"answer": f"Here is what I found: {answer}."})

    def judge(self, prompt: str) -> str:
        results = re.findall(r"\) -> (.*)$", prompt, re.M)
        answer = prompt.split("Final answer: ", 1)[1].split("\n\nReply with", 1)[0]
        ok = all(result in answer for result in results)
        return json.dumps({"reason": "Every result is in the answer." if ok else "The answer leaves out results.",
                           "answers": ok})


def funnel(step: dict) -> list[tuple[str, int, int]]:
    """Per check: trajectories that reached it and those that passed it."""
    dropped = step.get("dropped", {})
    reached = step["rows_in"] - sum(dropped.get(r, 0) for r in ("truncated", "backend_error"))
    out = []
    for check, also in (("format", ("no_call", "unneeded_call", "repeated_call")), ("execution", ()),
                        ("semantic", ("parse_error",))):
        passed = reached - dropped.get(check, 0) - sum(dropped.get(r, 0) for r in also)
        out.append((check, reached, passed))
        reached = passed
    return out


def run(label: str, overrides: list[str], factory, out: Path) -> tuple[dict, Path, float]:
    recipe = load_recipe(ROOT / "recipes" / "tool_use.yaml", overrides=overrides)
    driver = Driver(Cache(out / "cache"), progress=False, backend_factory=factory) if factory else \
        Driver(Cache(out / "cache"), progress=False)
    started = time.perf_counter()
    version, manifest, _ = run_recipe(recipe, out / label, driver=driver)
    return manifest, version, time.perf_counter() - started


def report(label: str, manifest: dict, seconds: float) -> None:
    queries, _, calls = manifest["steps"]
    print(f"\n{label}: {queries['rows_out']} requests written, {calls['rows_in']} trajectories, "
          f"{calls['rows_out']} kept, {seconds:.0f} s")
    print(f"  {'check':<10} {'reached':>8} {'passed':>8} {'share':>7}")
    for check, reached, passed in funnel(calls):
        print(f"  {check:<10} {reached:>8} {passed:>8} {passed / reached if reached else math.nan:>7.0%}")
    print(f"  drops: {json.dumps(calls.get('dropped', {}), sort_keys=True)}")


TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments }}}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_one_step(version: Path, out: Path) -> None:
    """Exports the version for TRL and runs one SFTTrainer step on it (the embedded model)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from factory.exports import export
    from factory.models import EMBEDDED, export_model

    export(version, "trl-sft", out / "trl")
    model_dir = out / "embedded"
    export_model(EMBEDDED, model_dir)
    rows = datasets.load_dataset("json", data_files=str(out / "trl" / "train.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(out / "sft"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=1024)
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    result = trainer.train()
    first = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    print(f"\nTRL SFTTrainer on the exported rows ({len(rows)} rows, trl-sft): 1 step, loss {result.training_loss:.3f}, "
          f"{time.perf_counter() - started:.0f} s; the first row as trained starts:\n  "
          + first[:400].replace("\n", "\n  "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="requests the scripted model writes")
    parser.add_argument("--skip-embedded", action="store_true", help="only the scripted model")
    parser.add_argument("--skip-train", action="store_true", help="no TRL step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if not args.skip_embedded:
            manifest, _, seconds = run("embedded", [], None, out)
            report("embedded SmolLM2-135M (recipes/tool_use.yaml as bundled)", manifest, seconds)
        strong = StrongModel()
        overrides = [f"steps[0].tool_queries.num_rows={args.rows}", "llm={backend: scripted, model: strong}"]
        manifest, version, seconds = run("scripted", overrides, strong, out)
        report(f"scripted stronger model, a fault in every {strong.fault_every}th request", manifest, seconds)
        faults = [p["fault"] for p in strong.plans.values() if p["fault"]]
        print(f"  faults injected: {json.dumps({c: faults.count(c) for c in CHECKS})}; kept rows with a fault: "
              f"{sum(strong.plans[r]['fault'] is not None for r in read_version(version)['instruction'].to_list())}")
        if not args.skip_train:
            train_one_step(version, out)


if __name__ == "__main__":
    main()
