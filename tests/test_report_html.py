"""`edgekd report RUN --html`: the page of a real tiny run opened in headless Chromium and read back as a
person sees it (tables, chart points, the hover tooltip); a run with nothing to show says so."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.report_html import render
from edgekd.runfolder import RunFolder

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver; .ci/run installs them)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _rows(driver, section: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [tr.text for tr in driver.find_elements(By.CSS_SELECTOR, f"#{section} table tbody tr")]


@pytest.mark.slow  # the shared tiny run through every stage (tests/conftest.py) takes ~30 s
def test_html_report_of_a_full_run_in_chromium(browser, full_run, tmp_path):
    full_run = full_run[0]  # a copy of the shared tiny run, which this test writes its page into
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    res = CliRunner().invoke(app, ["report", str(full_run), "--html"])
    assert res.exit_code == 0, res.output
    page = full_run / "report.html"
    assert res.output.strip() == str(page) and page.is_file()
    res = CliRunner().invoke(app, ["report", str(full_run), "--out", str(tmp_path / "elsewhere.html")])
    assert res.exit_code == 0 and res.output.strip() == str(tmp_path / "elsewhere.html"), res.output
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html

    manifest = json.loads((full_run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert manifest["primary_metric"] == "accuracy"  # recorded by the pipeline, read by the report
    results = json.loads((full_run / "bench" / "local" / "results.json").read_text())["results"]
    browser.get(page.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == "edgekd run 'tiny'"

    # Stages and timings: every stage, done, with its recorded seconds.
    rows = _rows(browser, "stages")
    assert [r.split()[0] for r in rows] == ["teacher", "distill", "baseline", "eval", "prune", "export", "quantize",
                                            "bench"]
    for row, name in zip(rows, [r.split()[0] for r in rows], strict=True):
        assert row.split()[1:3] == ["done", f"{stages[name]['seconds']:.2f}"], row

    # Accuracy: each model's test accuracy and agreement, in percent.
    ev = stages["eval"]["metrics"]
    acc = {r.split(" 2 ")[0] if r.startswith("student") else r.split()[0]: r for r in _rows(browser, "accuracy")}
    assert set(acc) == {"teacher", "student (distilled)", "student (no teacher)"}
    for label, who in (("teacher", "teacher"), ("student (distilled)", "student"), ("student (no teacher)", "baseline")):
        assert f"{100 * ev[who]['accuracy']:.2f} {100 * ev[who]['macro_f1']:.2f}" in acc[label], acc[label]
    assert "The student keeps" in browser.find_element(By.ID, "accuracy").text

    # Export parity and the quantize guard's decisions.
    parity = _rows(browser, "parity")
    assert len(parity) == 1 and parity[0].startswith("onnx ok fp32") and " passed 100.00 " in parity[0]
    guard = browser.find_element(By.ID, "guard").text
    q = stages["quantize"]["metrics"]
    assert f"recommended\n{q['recommended']}" in guard and "Accuracy guard" in guard and "Speed guard" in guard
    cands = _rows(browser, "guard")
    assert [c.split()[0] for c in cands] == [c["name"] for c in q["candidates"]]
    for row, c in zip(cands, q["candidates"], strict=True):
        assert ("chosen" in row.split()) == c["chosen"] and c["why"] in row
        assert f"{c['p50_ms']:.3f}" in row

    # Bench table: one row per measured model, with its p50 and accuracy.
    bench = {r.split()[0]: r for r in _rows(browser, "bench")}
    assert set(bench) == {e["name"] for e in results}
    timed = [e for e in results if e["status"] == "ok"]
    assert {"onnx", "pytorch-teacher", "pytorch-student"} <= {e["name"] for e in timed}
    for e in timed:
        assert f"{e['cases'][0]['p50_ms']:.3f}" in bench[e["name"]] and f"{e['accuracy']:.4f}" in bench[e["name"]]
    skipped = [e for e in results if e["status"] != "ok"]
    for e in skipped:
        assert "skipped" in bench[e["name"]]

    # The chart: one point per timed model; hovering one shows its name and figures.
    points = browser.find_elements(By.CSS_SELECTOR, "#bench svg.chart circle.pt")
    assert sorted(p.get_attribute("data-name") for p in points) == sorted(e["name"] for e in timed)
    tip = browser.find_element(By.ID, "tip")
    assert not tip.is_displayed()
    onnx = next(p for p in points if p.get_attribute("data-name") == "onnx")
    ActionChains(browser).move_to_element(onnx).perform()
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    # The point under the pointer answers: onnx, or a point drawn over it (int8 of a tiny model can sit
    # at the same latency and accuracy), which must then be the topmost element at onnx's centre.
    shown = tip.text.splitlines()[0]
    if shown != "onnx":
        top = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return document."
                                     "elementFromPoint(r.x + r.width / 2, r.y + r.height / 2).dataset.name", onnx)
        assert top == shown
    e = next(e for e in results if e["name"] == shown)
    assert tip.text.splitlines() == [shown, f"p50 latency: {e['cases'][0]['p50_ms']:.3f} ms",
                                     f"accuracy: {e['accuracy']:.4f}", f"size: {e['size_bytes'] / 1e6:.2f} MB"]
    teacher = next(p for p in points if p.get_attribute("data-name") == "pytorch-teacher")
    ActionChains(browser).move_to_element(teacher).perform()
    WebDriverWait(browser, 5).until(lambda d: tip.text.startswith("pytorch-teacher\n"))


def test_a_run_with_nothing_past_eval_says_so_and_escapes_what_it_shows(tmp_path):
    """A detection run stopped after eval: mAP is the headline metric, every empty section says why, and
    text from the run folder cannot inject markup."""
    run = RunFolder(tmp_path / "det")
    run.update_top(name="det", task="detection", primary_metric="map50_95")
    models = {"teacher": (0.41, 0.62, 3_011_612), "student": (0.37, 0.58, 733_236), "baseline": (0.33, 0.55, 733_236)}
    run.record("eval", "fp", {
        **{k: {"map50_95": a, "map50": b, "params": p, "size_bytes": 4 * p} for k, (a, b, p) in models.items()},
        "summary": {"test_images": 12, "student_keeps_teacher_map": 0.37 / 0.41, "student_params_ratio": 0.2435,
                    "distill_gain_over_baseline_map50_95": 0.04, "distill_gain_over_baseline_map50": 0.03},
    }, seconds=7.5)
    run.record("export", "fp", {"targets": {"tensorrt": {
        "status": "not_built", "built": False, "precision": "fp16", "parity": {"ran": False},
        "reason": "not built: <script>alert(1)</script> & more"}}}, seconds=1.0)
    (run.root / "recipe.yaml").write_text(yaml.safe_dump({"quantize": {"enabled": False}, "bench": {"enabled": False},
                                                          "prune": {"enabled": False}}))
    html = render(run)

    assert "<th class=\"n\">mAP@0.5:0.95 %</th><th class=\"n\">mAP@0.5 %</th>" in html
    assert "<td class=\"n\">37.00</td><td class=\"n\">58.00</td>" in html
    assert "+4.00 mAP@0.5:0.95 points" in html and "accuracy %" not in html
    assert "No bench results yet: run `edgekd bench" in html
    assert "No quantize stage in this run (quantize.enabled is false in recipe.yaml)" in html
    assert "No prune stage in this run" in html
    assert "not in this run: bench.enabled is False in recipe.yaml" in html
    assert "not run yet" in html  # teacher, distill, baseline: never recorded here
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert "<script>alert" not in html and html.count("<script>") == 1  # only the page's own tooltip script


def test_a_record_made_from_a_stage_run_again_since_is_marked_out_of_date_and_the_page_says_what_ships(tmp_path):
    """After `edgekd distill --force`, the eval record scored the old student: the console summary said so, the
    HTML page showed its figures and the gain as current and had no ship line."""
    run = RunFolder(tmp_path / "r")
    run.update_top(name="r", task="text-classification", primary_metric="accuracy")
    run.record("teacher", "t", {})
    run.will_read("distill", ["teacher"])
    run.record("distill", "d", {})
    run.will_read("eval", ["teacher", "distill"])
    run.record("eval", "e", {"teacher": {"accuracy": 0.9, "params": 10}, "student": {"accuracy": 0.8, "params": 5},
                             "summary": {"test_examples": 10}})
    (run.root / "export" / "onnx").mkdir(parents=True)
    (run.root / "export" / "onnx" / "artifact.json").write_text("{}")
    run.record("export", "x", {"targets": {"onnx": {"status": "ok"}}})
    assert "<strong>Out of date</strong>" not in render(run) and "export/onnx: the run&#x27;s only export" in render(run)
    run.will_read("distill", ["teacher"])
    run.record("distill", "d", {})  # run again
    html = render(run)
    assert "<strong>Out of date</strong>: this table is the eval stage's record, and the distill stage it was made " \
           "from was run again or removed since" in html
    assert html.count(">out of date<") == 1  # eval's status cell; export read nothing recorded here


def test_report_flags_for_the_bench_table_are_refused_where_no_table_is_printed(tmp_path):
    from edgekd.errors import EdgeKDError

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    res = CliRunner().invoke(app, ["report", str(run), "--html", "--compare", "raspberry-pi-5", "--device", "local"])
    assert isinstance(res.exception, EdgeKDError)
    assert str(res.exception) == ("--compare, --device: shape(s) the console's bench table, and --html writes the "
                                  "whole run without it: drop them, or the --html/--out")
    res = CliRunner().invoke(app, ["report", str(run), "--compare", "raspberry-pi-5"])
    assert str(res.exception) == (f"--compare: shape(s) the bench table, and {run} has no bench/ (run `edgekd bench` "
                                  "first): drop it")


def test_operators_kept_in_float_read_as_the_console_says_them(tmp_path):
    """The quantize record keeps each operator as {node, op_type, error_removed}: the page printed the dicts."""
    run = RunFolder(tmp_path / "r")
    run.update_top(name="r", task="text-classification", primary_metric="accuracy")
    guard = {"metric": "accuracy", "budget": 0.01, "passed": True, "drop": 0.004, "attempts": [{}, {}],
             "float_nodes": [{"node": "/layer.0/MatMul", "op_type": "MatMul", "error_removed": 0.3}, "/old/Gemm"]}
    run.record("quantize", "fp", {"method": "dynamic", "accuracy_guard": guard, "recommended": "quantized",
                                  "recommended_dir": str(run.root / "export" / "onnx-int8")})
    html = render(run)
    assert "/layer.0/MatMul (MatMul), /old/Gemm" in html and "error_removed" not in html
