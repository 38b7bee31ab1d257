"""distilabel's tasks as a recipe step: their prompts and parsing on the factory's LLM path.

The scripted backend plays the model. Each run checks what the task defines: the messages its
``format_input`` builds, the columns its ``format_output`` reads, and the rows it cannot read,
dropped as ``parse_error`` with the raw reply.
"""

from __future__ import annotations

import json
import pickle

import polars as pl
import pytest

from factory.build import run_recipe
from factory.cli import main
from factory.driver import Driver
from factory.errors import RecipeError
from factory.llm.requests import LLMClient
from factory.recipe import load_recipe
from factory.steps.context import StepContext
from factory.steps.distilabel import tasks
from factory.steps.drops import DROP, DROP_DETAIL, RAW_REPLY

from .test_structured_steps import Recorder

pytest.importorskip("distilabel", reason="the distilabel extra is not installed")

ROWS = [
    {"instruction": "Name a cat breed.", "generations": ["Siamese.", "A beagle."]},
    {"instruction": "Name a dog breed.", "generations": ["Beagle.", "Tabby."]},
    {"instruction": "Name a bird.", "generations": ["Robin."]},
]


def write_rows(tmp_path, rows=ROWS) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run(write_recipe, tmp_path, step: str, rules: list[tuple[str, str]], rows=ROWS):
    """The kept and rejected rows of a one-step recipe on ``rows``, its model replying by ``rules``
    ((regex, reply) pairs), and its manifest."""
    rule_lines = "".join(f"    - {{match: {json.dumps(m)}, reply: {json.dumps(r)}}}\n" for m, r in rules)
    path = write_recipe(f"name: dl\nllm:\n  backend: scripted\n  rules:\n{rule_lines}"
                        f"source: {{path: {write_rows(tmp_path, rows)}}}\nsteps:\n  - {step}\n"
                        "output: {format: raw}\n")
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out", driver=Driver(progress=False))
    rejected = list((version / "rejected").glob("*.parquet"))
    return (pl.read_parquet(version / "data"), pl.read_parquet(rejected) if rejected else pl.DataFrame(),
            manifest)


def step_of(options: dict):
    """A distilabel step with ``options``, built as a recipe builds it (no source needed)."""
    from factory.config import build
    from factory.registry import step_class

    cls = step_class("distilabel")
    problems = []
    config = build(cls.Config, options, ("steps", 0, "distilabel"), problems)
    assert not problems and not cls(config).check()
    return cls(config)


def asked(step, rows, reply_fn, enforces=False):
    """The step's output on ``rows`` and the requests it sent."""
    backend = Recorder(reply_fn, enforces)
    out = step.process(pl.DataFrame(rows), StepContext(llm=LLMClient(backend)))
    return out, backend.requests


# -- three tasks, run ----------------------------------------------------------------------------

def test_ultrafeedback_rates_each_generation_and_drops_a_reply_it_cannot_read(write_recipe, tmp_path):
    kept, rejected, manifest = run(write_recipe, tmp_path, "distilabel: {task: UltraFeedback, options: {aspect: "
                                   "honesty}}", [
        ("cat breed", "Rating: 5\nRationale: right\n\nRating: 1\nRationale: a dog"),
        ("dog breed", "I cannot rate these."),
        (".", "Rating: 4\nRationale: fine")])
    assert kept.columns == ["instruction", "generations", "ratings", "rationales"]
    assert kept.to_dicts()[0] == {**ROWS[0], "ratings": [5, 1], "rationales": ["right", "a dog"]}
    assert kept.to_dicts()[1]["ratings"] == [4]
    (drop,) = rejected.to_dicts()
    assert drop["instruction"] == "Name a dog breed." and drop["drop_reason"] == "parse_error"
    assert drop["raw_reply"] == "I cannot rate these."
    assert "UltraFeedback.format_output found none of its outputs (ratings, rationales)" in drop["drop_detail"]
    step_stats = manifest["steps"][0]
    assert step_stats["dropped"] == {"parse_error": 1}
    assert step_stats["report"]["distilabel"] == {"task": "UltraFeedback", "version": tasks.version(), "json": False}


def test_ultrafeedback_sends_the_papers_prompt_built_by_format_input():
    step = step_of({"task": "UltraFeedback", "options": {"aspect": "honesty"}})
    out, requests = asked(step, ROWS[:1], lambda conv, k: "Rating: 3\nRationale: ok\n\nRating: 2\nRationale: meh")
    (request,) = requests
    system, user = request.messages
    assert system["role"] == "system" and user["role"] == "user"
    built = step.task.format_input(ROWS[0])
    assert request.messages == built  # exactly the task's messages
    assert "Honesty and Uncertainty" in user["content"] and "Siamese." in user["content"]
    assert request.params.json_schema is None  # the backend does not enforce schemas: the text format
    assert out["ratings"].to_list() == [[3, 2]]


def test_text_generation_takes_its_template_option_samples_and_renamed_columns(write_recipe, tmp_path):
    rows = [{"topic": "tides", "level": "a child"}, {"topic": "rust", "level": "an engineer"}]
    step = ("distilabel: {task: TextGeneration, samples: 2, temperature: 0.8, "
            "options: {template: 'Explain {{ topic }} to {{ level }}.', columns: [topic, level]}, "
            "output_mappings: {generation: explanation}}")
    kept, rejected, _ = run(write_recipe, tmp_path, step, [(r"Explain (?P<what>\w+) to", "About {what}, take {sample}.")],
                            rows=rows)
    assert kept.height == 4 and rejected.height == 0
    assert kept.columns == ["topic", "level", "explanation", "sample"]
    assert sorted(kept.filter(pl.col("topic") == "tides")["explanation"]) == ["About tides, take 0.",
                                                                              "About tides, take 1."]
    step = step_of({"task": "TextGeneration", "samples": 2, "temperature": 0.8, "output_mappings": {"generation":
                    "explanation"}, "options": {"template": "Explain {{ topic }} to {{ level }}.",
                                                "columns": ["topic", "level"]}})
    assert step.requires() == ["topic", "level"] and step.produces() == ["explanation"]
    _, requests = asked(step, rows[:1], lambda conv, k: "x")
    assert requests[0].messages == [{"role": "user", "content": "Explain tides to a child."}]
    assert requests[0].params.n == 2 and requests[0].params.temperature == 0.8


def test_prometheus_eval_reads_its_result_and_maps_inputs_from_other_columns(write_recipe, tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Lyon"}]
    step = ("distilabel: {task: PrometheusEval, options: {mode: absolute, rubric: factual-validity}, "
            "input_mappings: {instruction: question, generation: answer}}")
    kept, rejected, _ = run(write_recipe, tmp_path, step, [(r"2\+2", "Feedback: Correct and complete. [RESULT] 5"),
                                                           (".", "Feedback: Lyon is not the capital.")], rows=rows)
    assert kept.to_dicts() == [{**rows[0], "feedback": "Correct and complete.", "result": 5}]
    (drop,) = rejected.to_dicts()
    assert drop["answer"] == "Lyon" and drop["drop_reason"] == "parse_error"
    assert drop["raw_reply"] == "Feedback: Lyon is not the capital."


def test_a_task_with_a_schema_asks_for_json_where_the_backend_enforces_it():
    rows = [{"instructions": ["Say hi.", "Prove Fermat's last theorem."]}]
    step = step_of({"task": "ComplexityScorer"})
    # Not enforced: the task's own text format, read by its own parser.
    out, requests = asked(step, rows, lambda conv, k: "[1] Score: 1\n[2] Score: 6")
    assert requests[0].params.json_schema is None and out["scores"].to_list() == [[1, 6]]
    # Enforced: the task's JSON Schema goes with the request, its fields described after the prompt,
    # and the JSON reply is read by the task (fenced or not).
    out, requests = asked(step, rows, lambda conv, k: '```json\n{"scores": [2, 5]}\n```', enforces=True)
    schema = json.loads(requests[0].params.json_schema)
    prompt = requests[0].messages[-1]["content"]
    assert prompt.startswith(step.task.format_input(rows[0])[-1]["content"])
    assert prompt.endswith("Reply with only a JSON object, no other text, with these fields:\n"
                           "- scores: a list of whole number")
    assert schema["properties"]["scores"]["items"] == {"type": "integer"}
    assert out["scores"].to_list() == [[2, 5]] and out[DROP].to_list() == [None]
    # A JSON reply that the task cannot read drops the row with the reply.
    out, _ = asked(step, rows, lambda conv, k: '{"scores": []}', enforces=True)
    assert out[DROP].to_list() == ["parse_error"] and out[RAW_REPLY].to_list() == ['{"scores": []}']
    # ... and a task whose options turn JSON off keeps its text format on that backend too.
    plain = step_of({"task": "ComplexityScorer", "options": {"use_default_structured_output": False}})
    _, requests = asked(plain, rows, lambda conv, k: "[1] Score: 1\n[2] Score: 6", enforces=True)
    assert requests[0].params.json_schema is None


def test_a_row_the_task_cannot_format_is_dropped_as_invalid_input():
    step = step_of({"task": "UltraFeedback"})
    out, requests = asked(step, [{"instruction": "x", "generations": None}], lambda conv, k: "never")
    assert requests == [] and out[DROP].to_list() == ["invalid_input"]
    assert "column 'generations' (input 'generations' of UltraFeedback) is null" in out[DROP_DETAIL][0]


def test_the_step_pickles_without_its_task_and_rebuilds_it():
    step = step_of({"task": "UltraFeedback", "options": {"aspect": "honesty"}})
    assert step.task is not None
    copy = pickle.loads(pickle.dumps(step))
    assert "task" not in copy.__dict__ and copy.task.aspect == "honesty"


# -- validation ----------------------------------------------------------------------------------

def problems_of(write_recipe, tmp_path, step: str, source: bool = True) -> str:
    src = f"source: {{path: {write_rows(tmp_path)}}}\n" if source else ""
    path = write_recipe(f"name: x\nllm: {{backend: transformers, model: embedded}}\n{src}steps:\n  - {step}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return str(err.value)


@pytest.mark.parametrize("step, expected", [
    ("distilabel: {task: Ultrafeedback}",
     "recipe.yaml:5: steps[0].distilabel.task: distilabel " + tasks.version() + " has no task 'Ultrafeedback'; "
     "did you mean 'UltraFeedback'?"),
    ("distilabel: {task: EvolInstruct, options: {num_evolutions: 2}}",
     "steps[0].distilabel.task: distilabel's EvolInstruct cannot run as a factory step: runs a loop of requests of "
     "its own (its process()), not one request per row (the factory's `evol_instruct` step does this)"),
    ("distilabel: {task: UltraFeedback, options: {aspekt: honesty}}",
     "steps[0].distilabel.options.aspekt: UltraFeedback has no option 'aspekt'; did you mean 'aspect'?"),
    ("distilabel: {task: UltraFeedback, options: {aspect: honest}}",
     "steps[0].distilabel.options.aspect: Input should be 'helpfulness', 'honesty'"),
    ("distilabel: {task: UltraFeedback, options: {num_generations: 3}}",
     "steps[0].distilabel.options.num_generations: 'num_generations' is a distilabel pipeline setting, not an "
     "option of UltraFeedback; use the step's `samples:`"),
    ("distilabel: {task: PrometheusEval, options: {rubric: helpfulness}}",
     "steps[0].distilabel.options.mode: PrometheusEval needs option 'mode'; add it under `options:` (one of "
     "absolute, relative)"),
    ("distilabel: {task: UltraFeedback, input_mappings: {generation: responses}}",
     "steps[0].distilabel.input_mappings.generation: UltraFeedback has no input 'generation'; did you mean "
     "'generations'?"),
    ("distilabel: {task: TextGeneration, template: 'Hi {{ instruction }}'}",
     "steps[0].distilabel.template: `template` does not apply: a distilabel task builds its own messages"),
    ("distilabel: {}", "steps[0].distilabel.task: the step needs a task; add `task:`"),
])
def test_recipe_errors_name_the_line_the_key_and_the_fix(write_recipe, tmp_path, step, expected):
    assert expected in problems_of(write_recipe, tmp_path, step)


def test_missing_input_columns_are_found_before_any_model_loads(write_recipe, tmp_path, monkeypatch):
    from factory.llm import transformers_backend

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers_backend.TransformersBackend, "__init__", no_model)
    text = problems_of(write_recipe, tmp_path, "distilabel: {task: QualityScorer}")
    assert "steps[0].distilabel: needs column 'responses', which neither the source (instruction, generations)" \
           in text
    # Mapped, it is found.
    path = write_recipe(f"name: x\nllm: {{backend: transformers, model: embedded}}\nsource: {{path: "
                        f"{write_rows(tmp_path)}}}\nsteps:\n  - distilabel: {{task: QualityScorer, input_mappings: "
                        "{responses: generations}}\n")
    assert load_recipe(path).steps[0].requires() == ["instruction", "generations"]


def test_without_the_extra_the_step_says_how_to_install_it(write_recipe, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distilabel" else real(name, *a))
    tasks.tasks_module.cache_clear()
    tasks.catalog.cache_clear()
    try:
        path = write_recipe(f"name: x\nllm: {{backend: scripted}}\nsource: {{path: {write_rows(tmp_path)}}}\n"
                            "steps:\n  - distilabel: {task: UltraFeedback}\n")
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("error: " + str(path) + ":5: steps[0].distilabel.task: the distilabel step needs distilabel, "
                       "which is not installed; pip install 'dataset-factory[distilabel]'")
        assert main(["steps", "distilabel"]) == 2
        assert "pip install 'dataset-factory[distilabel]'" in capsys.readouterr().err
    finally:
        tasks.tasks_module.cache_clear()
        tasks.catalog.cache_clear()


def test_a_distilabel_that_does_not_import_names_the_missing_need(monkeypatch):
    import sys

    tasks.tasks_module.cache_clear()
    monkeypatch.setitem(sys.modules, "distilabel.steps.tasks", None)
    try:
        with pytest.raises(tasks.DistilabelUnavailable, match=r"distilabel is installed but does not import .*"
                                                              r"pip install 'dataset-factory\[distilabel\]'"):
            tasks.tasks_module()
    finally:
        tasks.tasks_module.cache_clear()


# -- the listing ---------------------------------------------------------------------------------

def test_factory_steps_distilabel_lists_tasks_with_their_columns(capsys):
    assert main(["steps", "distilabel"]) == 0
    out = capsys.readouterr().out
    listing = out[out.index(f"distilabel {tasks.version()} tasks"):]
    assert "UltraFeedback" in listing and "instruction, generations -> ratings, rationales [JSON schema]" in listing
    assert "TextGeneration                   instruction, system_prompt? -> generation" in listing
    runnable, not_runnable = listing.split("not runnable as a step:")
    assert "EvolInstruct " in not_runnable and "MagpieGenerator" in not_runnable and "Genstruct" in runnable
    assert main(["steps", "distilabel", "UltraFeedback"]) == 0
    out = capsys.readouterr().out
    assert "aspect = 'overall-rating'    [one of helpfulness, honesty" in out
    assert main(["steps", "distilabel", "Ultrafeedback"]) == 2
    assert "did you mean 'UltraFeedback'?" in capsys.readouterr().err


def test_every_listed_task_builds_its_messages_from_its_declared_inputs():
    """The catalogue's claim, task by task: with placeholder inputs, format_input gives text messages."""
    for name, task in tasks.catalog().items():
        built = task.sample()
        if task.reason is not None or built is None:
            continue
        inputs = {k: ["a", "b"] if k in ("generations", "responses", "instructions") else
                  [{"role": "user", "content": "hi"}] if k in ("messages", "conversation") else
                  {"format": "json", "schema": {"type": "object"}} if k == "structured_output" else "x"
                  for k in tasks.task_inputs(built)}
        messages, _ = tasks.messages(built, inputs)
        assert messages and all(isinstance(m["content"], str) for m in messages), name


def test_json_asked_of_a_task_without_a_schema_leaves_its_text_format():
    step = step_of({"task": "TextGeneration", "options": {"use_default_structured_output": True}})
    out, requests = asked(step, [{"instruction": "Say hi."}], lambda conv, k: "Hi there.")
    assert requests[0].params.json_schema is None and out["generation"].to_list() == ["Hi there."]
