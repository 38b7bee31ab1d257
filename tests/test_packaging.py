"""A built wheel carries everything the factory needs at run time (templates, bundled recipes and
data) and works outside the checkout; `factory recipes` and `factory init` start a new user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from factory import bundled
from factory.cli import main

from .conftest import HUB_RECIPES, ROOT

# What a wheel is built from: the distribution's files, nothing of the checkout's build/ or venvs.
SOURCES = ("pyproject.toml", "README.md", "factory", "filters", "trainers", "recipes", "data")
SCRIPTED = ("llm={backend: scripted, rules: [{match: 'Rate the response', reply: 'Looks fine. Score: {score}'}, "
            "{match: 'diverse tasks', reply: ' Explain idea number {hash} in simple words'}, "
            "{match: '.', reply: 'Answer {hash}. The answer is 42. Score: 7'}]}")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not p.name.startswith("."))


def _run(args: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the distribution's files, so that building writes nothing into the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source_tree, tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="the dev extra installs setuptools: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", source_tree, "--no-deps", "--no-build-isolation", "--no-index",
          "-w", out], cwd=out)
    (path,) = out.glob("*.whl")
    return path


def _fresh_venv(folder: Path) -> Path:
    """A venv of the base interpreter that sees the main venv's packages through a .pth file (so
    dependencies resolve offline) without running the main venv's .pth files (its editable
    install's finder): the factory comes only from what is installed into it."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", "--without-pip", folder], cwd=folder.parent)
    python = folder / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder).stdout.strip()
    main_site = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "main_venv.pth").write_text("\n".join(main_site) + "\n", encoding="utf-8")
    return python


def _pip_install(python: Path, *args) -> None:
    # --ignore-installed: pip sees the main venv's dataset-factory through the .pth and must not touch it.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed",
          *args], cwd=python.parent)


def test_wheel_holds_every_module_template_recipe_and_data_file(wheel, source_tree):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(source_tree).as_posix() for package in ("factory", "filters", "trainers")
                for p in (source_tree / package).rglob("*.py") if "__pycache__" not in p.parts}
    templates = list((source_tree / "factory" / "steps" / "templates").glob("*.j2"))
    assert len(templates) >= 16
    expected |= {p.relative_to(source_tree).as_posix() for p in templates}
    page = _files(source_tree / "factory" / "view" / "static")  # what `factory view` serves
    assert {p.name for p in page} >= {"index.html", "app.js", "style.css"}
    expected |= {p.relative_to(source_tree).as_posix() for p in page}
    recipes = list((source_tree / "recipes").glob("*.yaml"))
    data = _files(source_tree / "data")
    assert recipes and data
    expected |= {f"factory/_bundled/{p.relative_to(source_tree).as_posix()}" for p in recipes + data}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {len(missing)} files: {missing[:10]}"
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "data/"))]


def test_installed_wheel_lists_inits_and_runs_outside_the_checkout(wheel, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, wheel)
    factory = tmp_path / "venv" / "bin" / "factory"
    work = tmp_path / "work"
    work.mkdir()

    where = _run([python, "-c", "import factory, filters, trainers; from factory import bundled; "
                  "print(factory.__file__, filters.__file__, trainers.__file__, bundled.root())"], cwd=work)
    for path in where.stdout.split():
        assert path.startswith(str(tmp_path / "venv")), where.stdout
        assert not path.startswith(str(ROOT)), where.stdout

    help_text = _run([factory, "--help"], cwd=work).stdout
    assert "    recipes " in help_text and "    init " in help_text
    listing = _run([factory, "recipes"], cwd=work).stdout.splitlines()
    assert len(listing) == len(list((ROOT / "recipes").glob("*.yaml")))
    assert any(line.startswith("quickstart ") for line in listing)

    init = _run([factory, "init"], cwd=work).stdout
    assert "wrote quickstart.yaml" in init
    assert init.strip().endswith("next: factory run quickstart.yaml --out out")
    for rel, src in bundled.init_files("quickstart"):
        assert (work / rel).read_bytes() == src.read_bytes()

    # The quickstart brings its prompt inline; arithmetic_consistency's solve step renders the package's
    # own template (factory/steps/templates/solve.j2): the bug this guards against.
    _run([factory, "init", "arithmetic_consistency"], cwd=work)
    for recipe in ("quickstart.yaml", "arithmetic_consistency.yaml"):
        run = _run([factory, "run", recipe, "--out", "out", "--quiet", "--set", SCRIPTED], cwd=work)
        version = Path(work / run.stdout.strip().splitlines()[-1])
        manifest = json.loads((version / "manifest.json").read_text(encoding="utf-8"))
        llm_steps = [s for s in manifest["steps"] if s.get("llm")]
        assert llm_steps and sum(s["llm"]["conversations"] for s in llm_steps) > 0


def test_editable_install_finds_templates_recipes_and_data_in_the_checkout(source_tree, tmp_path):
    pytest.importorskip("setuptools", reason="the dev extra installs setuptools: pip install -e '.[dev]'")
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-e", source_tree)
    where = _run([python, "-c", "from factory import bundled; from factory.steps import prompts; "
                  "print(bundled.root(), prompts.TEMPLATE_DIR)"], cwd=tmp_path).stdout.split()
    assert where == [str(source_tree.resolve()), str(source_tree.resolve() / "factory" / "steps" / "templates")]
    listing = _run([tmp_path / "venv" / "bin" / "factory", "recipes"], cwd=tmp_path).stdout
    assert "quickstart " in listing


# -- factory recipes / factory init, in process ------------------------------------------------------

def test_bundled_root_in_the_checkout_is_the_project():
    assert bundled.root() == ROOT
    assert set(bundled.recipes()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}


def test_recipes_lists_one_line_per_bundled_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_summary_is_the_first_sentence_of_the_description_or_the_leading_comment(tmp_path):
    described = tmp_path / "a.yaml"
    described.write_text("# ignored\nname: a\ndescription: >-\n  Rows made well. Then more.\nsteps: []\n")
    assert bundled.summary(described) == "Rows made well."
    commented = tmp_path / "b.yaml"
    commented.write_text("# Tasks from seeds,\n# answered twice. More here.\nname: b\n")
    assert bundled.summary(commented) == "Tasks from seeds, answered twice."


def test_data_references_are_values_under_data():
    recipe = {"source": {"path": "data/seeds/tasks.jsonl"}, "llm": {"model": "embedded"},
              "steps": [{"decontaminate": {"eval": "data/eval/arithmetic.jsonl", "columns": ["instruction"]}},
                        {"chunk": {"path": "data/documents/", "other": "../data/x", "n": 3}},
                        {"decontaminate": {"eval": "data/eval/arithmetic.jsonl"}}]}
    assert bundled.data_references(recipe) == ["data/seeds/tasks.jsonl", "data/eval/arithmetic.jsonl",
                                               "data/documents"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
def test_init_writes_the_recipe_and_the_data_it_references(name, tmp_path, monkeypatch, capsys):
    import yaml

    import factory.sources

    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert main(["init", name]) == 0
    out = capsys.readouterr().out
    assert f"wrote {name}.yaml" in out and out.strip().endswith(f"next: factory run {name}.yaml --out out")
    assert (folder / f"{name}.yaml").read_bytes() == (ROOT / "recipes" / f"{name}.yaml").read_bytes()
    refs = bundled.data_references(yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text()))
    for ref in refs:
        assert (folder / ref).exists(), ref
        assert f"wrote {ref}" in out or f"wrote {ref}/" in out
    # The copy is what the recipe reads, from its folder or from elsewhere: the project's data is not needed.
    monkeypatch.setattr(factory.sources, "PROJECT_ROOT", tmp_path / "nowhere")
    local = [arg for override in HUB_RECIPES.get(name, []) for arg in ("--set", override)]
    assert main(["validate", f"{name}.yaml", *local]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["validate", f"here/{name}.yaml", *local]) == 0


def test_init_never_overwrites_and_writes_nothing_when_it_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("name: mine\n")
    assert main(["init"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: quickstart.yaml already exists")
    assert "factory init quickstart --force" in err
    assert (tmp_path / "quickstart.yaml").read_text() == "name: mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart.yaml"]

    assert main(["init", "--force"]) == 0
    capsys.readouterr()
    assert (tmp_path / "quickstart.yaml").read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    # A second init leaves identical files alone and succeeds.
    assert main(["init"]) == 0
    assert "kept  quickstart.yaml" in capsys.readouterr().out


def test_init_of_an_unknown_name_lists_the_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "quikstart"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown recipe 'quikstart'; did you mean 'quickstart'?" in err
    assert "self_instruct" in err
    assert main(["init", "zzz"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "quickstart, " in err
    assert list(tmp_path.iterdir()) == []
    # The recipe's own `name:` spelling works too.
    assert main(["init", "self-instruct"]) == 0
    assert (tmp_path / "self_instruct.yaml").is_file()
