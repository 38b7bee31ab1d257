"""``factory view`` in a real browser: headless Chromium, driven by Selenium, against the real
server started as `factory view OUT --port 0` over a folder made here by running a recipe on the
scripted backend (two versions) and a three-round evolve run (training and eval scripted).

Without Chromium, chromedriver or selenium the tests skip, unless FACTORY_REQUIRE_BROWSER=1 (CI)
makes that a failure. `make browser` installs the browser; `make screenshots` keeps a picture of
each page in docs/viewer (FACTORY_SCREENSHOTS=FOLDER does that anywhere).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from factory.build import run_recipe
from factory.evolve.loop import Evolution
from factory.recipe import load_recipe

from .conftest import ROOT
from .test_evolve_verifiers import scripted_rounds, verifier_recipe

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 15  # seconds for anything the page does after a click (it talks to a local server only)

# Instructions a person would write, plus two that carry markup: the page must show them as text.
SCRIPT = "Explain what <script>alert(1)</script> does in a web page."
IMAGE = 'What does <img src=x onerror="window.__xss=1"> show?'
TOPICS = ["rain", "tides", "bread", "volcanoes", "magnets", "bees", "clocks", "glaciers", "bridges", "owls",
          "compost", "lenses", "sails", "rust", "echoes", "yeast", "comets", "coral", "kites", "fog",
          "salt", "moss", "thunder", "ink", "pulleys"]


# ---------------------------------------------------------------------------------------------
# The folder: two versions of `demo` and an evolve run

def demo_recipe(folder: Path) -> Path:
    seeds = folder / "seeds.jsonl"
    lines = [SCRIPT, IMAGE, "Describe a zebra in two sentences."] + [f"Explain {t} to a child." for t in TOPICS]
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in lines), encoding="utf-8")
    recipe = folder / "demo.yaml"
    # The judge cannot score the zebra task: those rows are dropped with the judge's raw reply.
    recipe.write_text(f"""\
name: demo
seed: 3
llm:
  backend: scripted
  rules:
    - {{match: "(?s)Rate the response.*zebra", reply: "I would rather not say."}}
    - {{match: "Rate the response", reply: "Looks fine. Score: {{score}}"}}
    - {{match: ".", reply: "Answer {{hash}}"}}
source: {{path: {seeds}}}
steps:
  - solve: {{samples: 4}}
  - judge: {{}}
  - score: {{min: 5}}
output: {{format: messages}}
""", encoding="utf-8")
    return recipe


def tools_recipe(folder: Path) -> Path:
    """A `tools` dataset: one trajectory that calls the bundled calculator, which runs."""
    (folder / "requests.jsonl").write_text('{"instruction": "What is 12.5 times 4?"}\n', encoding="utf-8")
    recipe = folder / "tools.yaml"
    tools = ROOT / "data" / "tools"
    recipe.write_text(f"""\
name: tools
seed: 3
llm:
  backend: scripted
  rules:
    - {{match: "Tool result \\\\(calculator", reply: '{{{{"answer": "12.5 times 4 is 50."}}}}'}}
    - {{match: ".", reply: '{{{{"tool_calls": [{{{{"name": "calculator", "arguments": {{{{"expression": "12.5 * 4"}}}}}}}}]}}}}'}}
source: {{path: {folder / "requests.jsonl"}}}
steps:
  - tool_calls: {{tools: {tools / "tools.json"}, implementations: {tools / "tools.py"}}}
output: {{format: messages}}
""", encoding="utf-8")
    return recipe


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    """OUT with demo v1, demo v2 (a stricter score filter, v1 as parent) and evolve-run/ (3 rounds,
    round 2 rolled back); returns what the tests check the page against."""
    work = tmp_path_factory.mktemp("view-site")
    out = work / "out"
    recipe = demo_recipe(work)
    v1, _, _ = run_recipe(load_recipe(recipe), out, progress=False)
    v2, _, _ = run_recipe(load_recipe(recipe, ["steps[2].score.min=7"]), out, progress=False, parent=str(v1))
    with pytest.MonkeyPatch.context() as monkeypatch:
        scripted_rounds(monkeypatch, {0: "1" * 20 + "0" * 20, 1: "1" * 30 + "0" * 10, 2: "0" * 40,
                                      3: "1" * 31 + "0" * 9})
        state = Evolution(str(verifier_recipe(work, tiny_model_dir, "  min_gap: null\n", rounds=3)),
                          out / "evolve-run", [], progress=False).run()
    # The scripted phases take a few ms each, recorded to 0.1 s: most often 0.0, so that the seconds
    # chart, which draws what the state says, would have nothing to draw. Known timings instead.
    for rs in state["rounds"]:
        rs["seconds"] = {phase: 1.0 + rs["round"] for phase in rs["seconds"]}
    (out / "evolve-run" / "evolve.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    run_recipe(load_recipe(tools_recipe(work)), out, progress=False)
    kept = pl.read_parquet(v1 / "data" / "*.parquet")
    rejected = pl.read_parquet(v1 / "rejected" / "*.parquet")
    assert kept.height > 50, "paging needs more than one page of kept rows; add topics"
    return {"out": out, "v1": v1, "v2": v2, "kept": kept, "rejected": rejected, "evolve": state}


@pytest.fixture(scope="module")
def server(site):
    """`factory view OUT --port 0 --sample 6` in its own process; the URL from its first line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "factory", "view", str(site["out"]), "--port", "0",
                                "--sample", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=60)
    except queue.Empty:
        first = ""
    found = re.search(r"at (http://\S+)", first)
    if not found:
        process.kill()
        raise AssertionError(f"factory view printed {first!r} instead of its URL; stderr: {process.stderr.read()}")
    yield found.group(1)
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def no_browser(reason: str):
    if os.environ.get("FACTORY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; FACTORY_REQUIRE_BROWSER=1 needs a real browser (make browser installs it)")
    pytest.skip(f"{reason} (make browser installs chromium and chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        no_browser("selenium is not installed (pip install -e '.[dev]')")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        no_browser(f"{', '.join(missing)} not found")
    options = webdriver.ChromeOptions()
    # Named binaries: Selenium Manager then has nothing to download.
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--disable-gpu", "--lang=en-US"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    except WebDriverException as e:
        no_browser(f"chromium did not start: {str(e).splitlines()[0]}")
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FACTORY_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Driving the page

def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector):
    found = css(driver, selector)
    assert len(found) == 1, f"expected one {selector!r} on the page, found {len(found)}"
    return found[0]


def error_line(driver) -> str:
    bar = css(driver, "#error-bar")
    return bar[0].text if bar and bar[0].is_displayed() else ""


def wait_for(driver, condition, what: str):
    """Waits until condition(driver) is truthy and returns it; a timeout names what was awaited
    and what the error bar said, if anything."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; error bar: {error_line(driver)!r}; "
                             f"hash: {driver.execute_script('return location.hash')}") from None


def open_page(driver, server, route: str, ready: str):
    """Loads #<route> in a fresh page and waits for the selector that shows it is drawn (a change of
    hash alone would leave the old page's elements there to be found until the new ones replace them)."""
    driver.get("about:blank")
    driver.get(f"{server}#{route}")
    wait_for(driver, lambda d: css(d, ready), f"{ready} on #{route}")


def screenshot(driver, folder: Path, name: str):
    # The whole page, not the first screenful: the window grows to the page (within reason) for the picture.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(900, height + 20), 3000))
    driver.save_screenshot(str(folder / name))
    driver.set_window_size(1280, 900)


def range_text(driver) -> str:
    return one(driver, "#range").text


def cards(driver):
    return css(driver, "#rows-list [data-testid=row]")


def no_alert(driver):
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 (the property raises when no alert is open)


def agreement_row(driver, label: str) -> dict:
    """The cells expected_agreement() computes (AUC, shown for scored steps, is the server's own sum)."""
    row = one(driver, f"[data-testid=agreement] tr[data-step='{label}']")
    return {cell.get_attribute("data-col"): cell.text for cell in row.find_elements("css selector", "td[data-col]")
            if cell.get_attribute("data-col") != "auc"}


def expected_agreement(marks: list[tuple[bool, str]]) -> dict:
    """The agreement row for (kept, verdict) pairs, computed here: tp = kept & good, fp = kept & bad,
    fn = dropped & good, tn = dropped & bad; Cohen's kappa of kept against good."""
    tp = sum(k and v == "good" for k, v in marks)
    fp = sum(k and v == "bad" for k, v in marks)
    fn = sum(not k and v == "good" for k, v in marks)
    tn = sum(not k and v == "bad" for k, v in marks)
    n = len(marks)
    observed = (tp + tn) / n
    chance = ((tp + fp) / n) * ((tp + fn) / n) + ((fn + tn) / n) * ((fp + tn) / n)
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    return {"n": str(n), "confusion": f"{tp} / {fp} / {fn} / {tn}",
            "precision": fmt(tp / (tp + fp) if tp + fp else None),
            "recall": fmt(tp / (tp + fn) if tp + fn else None),
            "kappa": fmt((observed - chance) / (1 - chance) if chance < 1 else None),
            "disagree": str(fp + fn)}


def mark(driver, card, verdict: str, note: str = ""):
    if note:
        field = card.find_element("css selector", "[data-testid=note]")
        field.clear()
        field.send_keys(note)
    card.find_element("css selector", f"button[data-verdict={verdict}]").click()
    state = card.find_element("css selector", "[data-testid=verdict-state]")
    wait_for(driver, lambda d: state.get_attribute("data-verdict") == verdict, f"the card to show {verdict}")


# ---------------------------------------------------------------------------------------------
# The pages

def test_version_list_then_a_version(browser, server, site, shots):
    open_page(browser, server, "/", "[data-testid=version-link]")
    assert one(browser, "#root-path").text == str(site["out"].resolve())
    demo = one(browser, "[data-testid=versions][data-ds=demo]")
    rows = {tr.get_attribute("data-v"): tr.find_elements("css selector", "td") for tr in
            demo.find_elements("css selector", "tbody tr")}
    assert set(rows) == {"1", "2"}
    assert rows["1"][2].text == str(site["kept"].height) and rows["1"][3].text == str(site["rejected"].height)
    assert rows["2"][8].text == "demo v1"  # the parent, as a link
    assert css(browser, "[data-testid=evolve-link][data-run=evolve-run]")
    screenshot(browser, shots, "versions.png")

    one(browser, "[data-testid=version-link][data-ds=demo][data-v='1']").click()
    wait_for(browser, lambda d: css(d, "#steps-table"), "the version page")
    assert one(browser, "#version-title").text == "demo v1"
    manifest = json.loads((site["v1"] / "manifest.json").read_text())
    steps = css(browser, "#steps-table tbody tr")
    assert [s.get_attribute("data-step") for s in steps] == [f"steps[{i}].{s['name']}"
                                                              for i, s in enumerate(manifest["steps"])]
    assert [s.find_elements("css selector", "td")[2].text for s in steps] == [f"{s['rows_out']:,}"
                                                                             for s in manifest["steps"]]
    screenshot(browser, shots, "version.png")
    assert error_line(browser) == ""


def test_an_api_error_is_one_line_and_the_page_goes_on(browser, server):
    open_page(browser, server, "/v/demo/99", "#app a[href='#/']")
    assert "demo has no version v99" in wait_for(browser, error_line, "the error bar")
    one(browser, "[data-testid=home-link]").click()
    wait_for(browser, lambda d: css(d, "[data-testid=version-link]"), "the version list after an error")
    assert error_line(browser) == ""


def test_rows_page_search_facets_and_escaping(browser, server, site, shots):
    kept = site["kept"]
    open_page(browser, server, "/v/demo/1", "[data-testid=tab-rows]")
    one(browser, "[data-testid=tab-rows]").click()
    wait_for(browser, lambda d: cards(d), "the first page of rows")
    assert range_text(browser) == f"rows 1–50 of {kept.height}" and len(cards(browser)) == 50
    assert re.fullmatch(r"\d+\.\d ms", one(browser, "#ms").text)
    one(browser, "#next").click()
    wait_for(browser, lambda d: range_text(d) == f"rows 51–{kept.height} of {kept.height}", "the second page")
    assert cards(browser)[0].get_attribute("data-index") == "50", [(c.get_attribute("data-part"), c.get_attribute("data-index")) for c in cards(browser)][:5]

    # Search: only the rows whose text holds the words, counted by the server.
    one(browser, "#search").send_keys("script")
    matching = kept.filter(pl.col("instruction").str.contains("script", literal=True)).height
    wait_for(browser, lambda d: range_text(d) == f"rows 1–{matching} of {matching}", "the search results")
    assert "q=script" in browser.execute_script("return location.hash")
    for card in cards(browser):
        field = card.find_element("css selector", "[data-field=instruction] dd")
        assert field.text == SCRIPT  # the markup is shown as text
        bubbles = [b.text for b in card.find_elements("css selector", ".conversation .bubble")]
        assert bubbles[0] == SCRIPT and len(bubbles) == 2
    screenshot(browser, shots, "rows.png")

    one(browser, "#search").clear()
    one(browser, "#search").send_keys("onerror")
    wait_for(browser, lambda d: cards(d) and all(IMAGE in c.text for c in cards(d)), "the <img> rows")
    assert not css(browser, "#app script") and not css(browser, "#app img")
    assert browser.execute_script("return window.__xss") is None
    no_alert(browser)

    # A facet: sample = 1 keeps exactly the rows polars counts.
    open_page(browser, server, "/v/demo/1/rows", "select[data-testid=facet][data-col=sample]")
    from selenium.webdriver.support.ui import Select

    Select(one(browser, "select[data-testid=facet][data-col=sample]")).select_by_value("1")
    wanted = kept.filter(pl.col("sample") == 1).height
    wait_for(browser, lambda d: range_text(d) == f"rows 1–{min(wanted, 50)} of {wanted}", "the facet's rows")
    assert {c.find_element("css selector", "[data-field=sample] dd").text for c in cards(browser)} == {"1"}
    assert error_line(browser) == ""


def test_tool_calls_show_as_calls_and_results(browser, server):
    open_page(browser, server, "/v/tools/1/rows", ".conversation")
    card = cards(browser)[0]
    roles = [r.text for r in card.find_elements("css selector", ".conversation .role")]
    assert roles == ["user", "assistant", "tool · calculator", "assistant"]
    calls = [c.text for c in card.find_elements("css selector", ".conversation .tool-call")]
    assert calls == ['calculator({"expression": "12.5 * 4"})']
    bubbles = [b.text for b in card.find_elements("css selector", ".conversation .bubble")]
    assert bubbles[2:] == ["50.0", "12.5 times 4 is 50."]
    assert error_line(browser) == ""


def test_rejected_rows_by_step_and_reason(browser, server, site, shots):
    rejected = site["rejected"]
    open_page(browser, server, "/v/demo/1/rejected", "[data-testid=group]")
    groups = {(g.get_attribute("data-step"), g.get_attribute("data-reason")): g for g in
              css(browser, "[data-testid=group]")}
    counted = rejected.group_by(["drop_step", "drop_reason"]).len()
    assert set(groups) == {(r["drop_step"], r["drop_reason"]) for r in counted.to_dicts()}
    groups[("steps[1].judge", "parse_error")].click()
    judge_drops = counted.filter(pl.col("drop_reason") == "parse_error")["len"][0]
    wait_for(browser, lambda d: range_text(d) == f"rows 1–{judge_drops} of {judge_drops}", "the judge's drops")
    for card in cards(browser):
        drop = card.find_element("css selector", "[data-testid=drop]")
        assert drop.find_element("css selector", "[data-field=drop_reason]").text.endswith("parse_error")
        assert drop.find_element("css selector", "[data-field=raw_reply] pre").text == "I would rather not say."
        assert "no score found" in drop.find_element("css selector", "[data-field=drop_detail]").text
    assert "group active" in one(browser, "[data-testid=group][data-reason=parse_error]").get_attribute("class")
    screenshot(browser, shots, "rejected.png")
    assert error_line(browser) == ""


def test_verdicts_change_the_agreement_table(browser, server, site, shots):
    open_page(browser, server, "/v/demo/1/rows", "[data-testid=row]")
    assert not css(browser, "[data-testid=agreement]")  # no verdicts yet: no table
    marks = []
    for card, verdict in zip(cards(browser)[:3], ["good", "good", "bad"]):
        mark(browser, card, verdict, note="answer is off" if verdict == "bad" else "")
        marks.append((True, verdict))
    expected = expected_agreement(marks)
    wait_for(browser, lambda d: css(d, "[data-testid=agreement]") and agreement_row(d, "version") == expected,
             f"the agreement of the version to be {expected}")
    assert agreement_row(browser, "steps[2].score") == expected
    assert one(browser, "[data-testid=verdict-count]").text == "3 verdicts (2 good, 1 bad)"

    # A row the score filter dropped, marked bad: a true negative for the filter and the version.
    open_page(browser, server, "/v/demo/1/rejected?step=steps%5B2%5D.score&reason=below_min", "[data-testid=row]")
    mark(browser, cards(browser)[0], "bad")
    marks.append((False, "bad"))
    expected = expected_agreement(marks)
    wait_for(browser, lambda d: agreement_row(d, "version") == expected, f"the agreement to become {expected}")
    assert agreement_row(browser, "steps[2].score") == expected

    # The disagreements link opens exactly the rows people and the version disagree on.
    one(browser, "[data-testid=agreement] tr[data-step=version] [data-testid=disagree-link]").click()
    wait_for(browser, lambda d: css(d, "[data-testid=picked-title]"), "the disagreeing rows")
    picked = cards(browser)
    assert [(c.get_attribute("data-part"), c.get_attribute("data-index")) for c in picked] == [("data", "2")]

    # Verdicts and notes are kept by the server: a reload shows them.
    browser.refresh()
    wait_for(browser, lambda d: cards(d), "the rows after a reload")
    card = cards(browser)[0]
    assert card.find_element("css selector", "[data-testid=verdict-state]").text == "bad"
    assert card.find_element("css selector", "[data-testid=note]").get_attribute("value") == "answer is off"

    open_page(browser, server, "/v/demo/1", "[data-testid=agreement]")
    screenshot(browser, shots, "agreement.png")
    open_page(browser, server, "/", "#agreement-home")
    first = css(browser, "main section")[0]
    assert first.get_attribute("id") == "agreement-home"
    assert first.find_element("css selector", "h2").get_attribute("textContent") == "Judges against people"
    assert agreement_row(browser, "version") == expected
    assert error_line(browser) == ""


def test_label_page_counts_progress(browser, server, shots):
    open_page(browser, server, "/v/demo/1/label", "#label-progress")
    items = cards(browser)
    assert len(items) == 6
    strata = [c.find_element("css selector", ".row-head").text for c in items]
    assert any("kept" in s for s in strata) and any("below_min" in s for s in strata)
    done = sum(bool(c.get_attribute("data-verdict")) for c in items)
    assert one(browser, "#label-progress").text == f"{done} of 6 labelled"
    todo = next((c for c in items if not c.get_attribute("data-verdict")), None)
    if todo is not None:
        mark(browser, todo, "good")
        wait_for(browser, lambda d: one(d, "#label-progress").text == f"{done + 1} of 6 labelled", "the progress")
    screenshot(browser, shots, "label.png")
    assert error_line(browser) == ""


def test_card_and_diff(browser, server, site, shots):
    open_page(browser, server, "/v/demo/1/card", "#card-body h1")
    assert one(browser, "#card-body h1").text == "demo (v1)"
    assert css(browser, "#card-body table tbody tr")  # the steps table of the card
    screenshot(browser, shots, "card.png")

    from selenium.webdriver.support.ui import Select

    Select(one(browser, "#compare-select")).select_by_value("2")
    wait_for(browser, lambda d: css(d, "#recipe-changes"), "the diff page")
    change = one(browser, "#recipe-changes tbody tr").find_elements("css selector", "td")
    assert [c.text for c in change[:3]] == ["steps[2].score.min", "5", "7"]
    # v2 keeps a subset of v1 (the same replies, a higher bar): rows go, none come.
    v2_rows = pl.read_parquet(site["v2"] / "data" / "*.parquet").height
    summary = one(browser, "#diff-summary tbody tr").find_elements("css selector", "td")
    assert summary[0].text == str(site["kept"].height) and summary[1].text == str(v2_rows)
    assert one(browser, "#diff-summary td[data-col=added]").text == "0"
    assert one(browser, "#diff-summary td[data-col=removed]").text == f"−{site['kept'].height - v2_rows}"
    assert one(browser, "#diff-summary td[data-col=common]").text == str(v2_rows)
    screenshot(browser, shots, "diff.png")
    assert error_line(browser) == ""


def test_evolve_run_charts(browser, server, site, shots):
    rounds = site["evolve"]["rounds"]
    open_page(browser, server, "/", "[data-testid=evolve-link]")
    one(browser, "[data-testid=evolve-link][data-run=evolve-run]").click()
    wait_for(browser, lambda d: css(d, "#rounds-table"), "the evolve page")
    for chart in ("chart-accuracy", "chart-gain", "chart-passk", "chart-seconds"):
        svg = one(browser, f"svg[data-testid={chart}]")
        assert svg.find_elements("css selector", ".tick"), f"{chart} has no axis ticks"
        marks = svg.find_elements("css selector", "circle.pt, rect.bar")
        assert marks, f"{chart} has no points"
        assert all(m.find_elements("css selector", "title") for m in marks)
    accuracy = css(browser, "svg[data-testid=chart-accuracy] circle.pt[data-series='eval accuracy']")
    assert [p.get_attribute("data-x") for p in accuracy] == [str(r["round"]) for r in rounds]
    assert [m.get_attribute("data-x") for m in css(browser, "[data-testid=rollback-mark]")] == ["2"]
    table = {tr.get_attribute("data-round"): tr.text for tr in css(browser, "#rounds-table tbody tr")}
    assert set(table) == {"0", "1", "2", "3"}
    assert "rolled back to round 1" in table["2"] and "kept" in table["3"]
    assert table["1"].split()[1] == f"{rounds[1]['eval']['accuracy']:.3f}"
    screenshot(browser, shots, "evolve.png")
    css(browser, "[data-testid=round-version]")[0].click()
    wait_for(browser, lambda d: css(d, "#version-title"), "round 1's version")
    assert one(browser, "#version-title").text == "tiny-verifiers v1"
    assert error_line(browser) == ""
