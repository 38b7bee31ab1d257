"""The shape the code keeps: no import cycles, executors that know nothing of steps'
internals or backends, one hop from a recipe key to its file, step classes that fit on a screen
(and no class of steps or filters, base classes included, past twice that)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from factory.cli import main
from factory.registry import STEPS, source_file, step_class

from .conftest import ROOT

PACKAGES = ("factory", "filters", "trainers")
MAX_CLASS_LINES = 80
MAX_ANY_CLASS_LINES = 120  # any class in factory/steps and filters, base classes included


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at the top or inside a function, with the
    packages whose ``__init__`` an import runs (but its own packages, which Python has
    initialised before ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & modules.keys()
    ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
    return found - {name} - ancestors


def test_no_module_imports_one_that_imports_it_back():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return False

    circles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert circles == []


def test_executors_know_nothing_of_step_internals_or_backends():
    forbidden = re.compile(r"class .*\(GlobalStep, LLMStep\)|__new__|_model_path|backend ==|\.llm_config|"
                           r"from \.\.llm import|from \.\.steps\.(?!base |context )")
    for path in (ROOT / "factory" / "executors").glob("*.py"):
        assert not forbidden.search(path.read_text(encoding="utf-8")), path.name
    stacked = re.compile(r"class \w+\((?:GlobalStep, LLMStep|LLMStep, GlobalStep)")
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert not stacked.search(path.read_text(encoding="utf-8")), path


@pytest.mark.parametrize("key", STEPS)
def test_a_recipe_key_finds_its_class_in_the_file_named_after_it(key):
    cls = step_class(key)
    assert cls.name == key
    assert source_file(key).stem == key


@pytest.mark.parametrize("key", STEPS)
def test_step_classes_fit_on_a_screen(key):
    lines, _ = inspect.getsourcelines(step_class(key))
    assert len(lines) <= MAX_CLASS_LINES, f"{key}: {len(lines)} lines; move parsing and prompt helpers beside it"


def test_no_class_in_steps_or_filters_passes_120_lines():
    too_long = []
    for folder in (ROOT / "factory" / "steps", ROOT / "filters"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    lines = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                    if lines > MAX_ANY_CLASS_LINES:
                        too_long.append(f"{path.relative_to(ROOT)}: {node.name}, {lines} lines")
    assert too_long == [], "move helpers beside the class, as module functions"


def test_factory_steps_name_prints_the_file(capsys):
    assert main(["steps", "grounded_answer"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("grounded_answer: ") and first.endswith("factory/steps/grounded/grounded_answer.py")


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


ABOVE_THE_DRIVER = ("factory.recipe", "factory.build", "factory.evolve", "factory.cli", "factory.report",
                    "factory.estimate", "factory.bundled")
BELOW_THE_DRIVER = ("factory.executors", "factory.steps", "factory.llm", "filters")
WHAT_A_CONSUMER_NEEDS = {"factory", "factory.config", "factory.errors", "factory.store", "factory.models",
                         "factory.training", "factory.files"}


def test_data_flows_one_way_nothing_below_the_driver_imports_what_is_above_it():
    graph = import_graph()
    upward = {name: sorted(m for m in targets if m.startswith(ABOVE_THE_DRIVER))
              for name, targets in graph.items() if name.startswith(BELOW_THE_DRIVER + ("factory.driver",))}
    assert {name: up for name, up in upward.items() if up} == {}


def test_trainers_are_plain_consumers_and_the_factory_never_imports_them_at_module_level():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("trainers"):
            assert {m for m in targets if not m.startswith("trainers")} <= WHAT_A_CONSUMER_NEEDS, name
    for name, path in project_modules().items():
        if name.startswith(("factory", "filters")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
            top += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
            assert not [m for m in top if m.split(".")[0] == "trainers"], name


def test_loading_a_recipe_with_an_evolve_section_imports_no_trainer():
    import subprocess
    import sys

    code = ("import sys; from factory.recipe import load_recipe; load_recipe('recipes/self_evolve_arith.yaml'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainers', 'trl', 'peft', 'torch'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
