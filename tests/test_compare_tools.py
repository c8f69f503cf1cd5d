"""benchmarks/compare_tools.py on a tiny run folder built here: every row measured, the Optimum path
made offline from the local student, ratios and the verdict computed from the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgekd.devices import measure

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_LEN = 16
# torchao eager here (--torchao eager): compiling costs minutes on a loaded 2-core machine; the
# compiled path is loaded and run by test_torchao_compiled_runner.
USUAL = {"student-fp32", "optimum-onnx-fp32", "optimum-onnx-int8", "openvino-nncf-int8", "torchao-int8"}
# The usual tools on the distilled student and on the pruned one (the model edgekd ships).
EXPECTED_ROWS = {"teacher-fp32", "edgekd-onnx", "edgekd-onnx-int8", *USUAL, *{f"pruned-{n}" for n in USUAL}}


@pytest.fixture
def tools(monkeypatch):
    """The script's modules, imported the way the script imports them (its folder first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _compare_report
    import _optimum_path
    import compare_tools

    return compare_tools, _compare_report, _optimum_path


def _row(name, group="edgekd", acc=0.8, size=100, peak=10.0, p50s=None, tputs=None, label=None, status="ok",
         val_p50s=None):
    """A row of compare.json; ``val_p50s``: its p50s timed on validation texts (a candidate of the best artifact)."""
    p50s = p50s or {1: 2.0, 8: 8.0}
    tputs = tputs or {b: b * 1000 / v for b, v in p50s.items()}
    row = {"name": name, "label": label or name, "group": group, "status": status, "accuracy": acc,
           "size_bytes": size, "memory": {"peak_delta_mb": peak},
           "cases": {str(b): {"p50_ms": p50s[b], "throughput": tputs[b]} for b in p50s}}
    if val_p50s is not None:
        row["val_cases"] = {str(b): {"p50_ms": v, "inputs_sha256": "v" * 64} for b, v in val_p50s.items()}
    return row


def test_ratios_against_a_reference(tools):
    _, rep, _ = tools
    rows = [_row("teacher-fp32", "teacher", acc=0.90, size=400, peak=40.0, p50s={1: 10.0, 8: 40.0}),
            _row("edgekd-onnx-int8", acc=0.88, size=100, peak=10.0, p50s={1: 2.0, 8: 16.0}),
            _row("broken", acc=None, size=None, peak=None, p50s={1: 5.0})]
    r = rep.ratios(rows, "teacher-fp32", [1, 8])
    e = r["edgekd-onnx-int8"]
    assert e["p50_speedup"] == {"1": pytest.approx(5.0), "8": pytest.approx(2.5)}
    assert e["throughput_ratio"]["8"] == pytest.approx((8000 / 16) / (8000 / 40))
    assert e["size_ratio"] == pytest.approx(0.25) and e["peak_memory_ratio"] == pytest.approx(0.25)
    assert e["accuracy_delta"] == pytest.approx(-0.02)
    assert r["teacher-fp32"]["p50_speedup"]["1"] == pytest.approx(1.0)
    b = r["broken"]
    assert b["p50_speedup"] == {"1": pytest.approx(2.0), "8": None}  # no figure: no ratio, not zero
    assert b["size_ratio"] is None and b["accuracy_delta"] is None and b["peak_memory_ratio"] is None
    assert rep.ratios(rows, "absent", [1])["edgekd-onnx-int8"]["p50_speedup"] == {"1": None}


def test_best_artifact_is_the_fastest_within_budget_on_validation(tools):
    _, rep, _ = tools
    rows = [_row("student-fp32", "student", acc=0.80),
            _row("edgekd-onnx", acc=0.80, p50s={1: 3.0}, val_p50s={1: 3.0}),
            _row("edgekd-onnx-int8", acc=0.795, p50s={1: 2.0}, val_p50s={1: 2.0}),
            _row("edgekd-executorch", acc=0.70, p50s={1: 1.0}, val_p50s={1: 1.0})]  # fastest, but 10 points worse
    for r in rows:  # validation decides; the test figures below would pick differently
        r["val_accuracy"] = r["accuracy"]
    rows[3]["accuracy"] = 0.99
    name, why = rep.select_best(rows, 0.80, 0.01, 1)
    assert name == "edgekd-onnx-int8" and "within 1.0 points" in why and "chosen on validation" in why
    assert [r.get("within_budget") for r in rows] == [None, True, True, False]
    assert rep.select_best(rows, 0.80, 0.001, 1)[0] == "edgekd-onnx"
    assert rep.select_best(rows, 0.80, 0.01, 1, forced="executorch")[0] == "edgekd-executorch"
    assert rep.select_best(rows, 0.99, 0.01, 1)[0] is None
    # what test would pick
    assert rep.select_best(rows, 0.80, 0.01, 1, key="accuracy", timing="cases")[0] == "edgekd-executorch"


def test_best_artifact_is_the_fastest_on_validation_texts_not_on_test(tools):
    """The latency that picks the best artifact is timed on validation texts: test's p50 only reports.
    Here the two splits order the candidates differently, and the pick follows validation."""
    _, rep, _ = tools
    rows = [{**_row("student-fp32", "student"), "val_accuracy": 0.80},
            {**_row("edgekd-onnx", p50s={1: 1.0, 8: 4.0}, val_p50s={1: 3.0}), "val_accuracy": 0.80},
            {**_row("edgekd-onnx-int8", p50s={1: 2.0, 8: 6.0}, val_p50s={1: 1.5}), "val_accuracy": 0.80}]
    name, why = rep.select_best(rows, 0.80, 0.01, 1)
    assert name == "edgekd-onnx-int8"  # the faster on validation, the slower on test
    assert "on validation texts" in why and "chosen on validation (accuracy and latency)" in why
    assert rep.select_best(rows, 0.80, 0.01, 1, timing="cases")[0] == "edgekd-onnx"  # what test would pick
    # A candidate not timed on validation texts is not chosen, however fast it is on test.
    rows.append({**_row("edgekd-executorch", p50s={1: 0.1, 8: 0.5}), "val_accuracy": 0.80})
    assert rep.select_best(rows, 0.80, 0.01, 1)[0] == "edgekd-onnx-int8"
    for r in rows:
        r.pop("val_cases", None)
    name, why = rep.select_best(rows, 0.80, 0.01, 1)
    assert name is None and "timed on validation texts at batch 1" in why
    # The candidates are those within the budget on validation and timed at the batch on test; not a twin
    # opened with ONNX Runtime's defaults.
    rows[1]["val_accuracy"] = 0.70
    rows[2]["meta"] = {"session_baseline_of": "edgekd-onnx"}
    rows[3]["cases"] = {}
    assert rep.candidates(rows, 0.80, 0.01, 1) == []
    assert [r["name"] for r in rep.candidates(rows, 0.80, 0.2, 1)] == ["edgekd-onnx"]


def test_candidates_are_timed_on_one_plan_of_validation_texts(tools, tmp_path, monkeypatch):
    """The validation timing: the candidates only, at the first batch size, each validation text once (at
    most the test timing's calls), the same calls for every candidate, in the test timing's processes and
    rounds, nothing scored."""
    compare_tools, _, _ = tools
    sent = []

    def rounds(specs, job, work, threads, timeout_s, n_rounds, evaluate=True, tag=""):
        with np.load(work / job["inputs"]) as z:
            sent.append((specs, job, evaluate, tag, n_rounds, z[f"rows_b{job['batch_sizes'][0]}"]))
        return {"models": {s["name"]: {"status": "ok", "cases": [{"batch": 1, "p50_ms": 1.0}]} for s in specs},
                "rounds": n_rounds, "process": "one per model and round", "timing_seconds": 0.5}, {}

    monkeypatch.setattr(compare_tools, "_time_in_rounds", rounds)
    n_test, n_val = 10, 7
    arrays = {"ids": np.zeros((n_test + n_val, 4), np.int64), "rows_b1": np.zeros((30, 1), np.int64)}
    segments = {"test": (0, n_test, None), "validation": (n_test, n_test + n_val, None)}
    specs = [{"name": "edgekd-onnx"}, {"name": "edgekd-onnx-int8"}]
    job = {"models": [*specs, {"name": "teacher-fp32"}], "warmup": 3, "threads": 1, "runs": {"1": 10},
           "batch_sizes": [1, 8], "inputs": "inputs.npz"}
    got = compare_tools._time_on_validation(specs, job, arrays, segments, 1, 10, 0, tmp_path, 1, 60, 9, False)
    (s, vjob, evaluate, tag, n_rounds, plan), = sent
    assert s == specs and vjob["models"] == specs and vjob["batch_sizes"] == [1] and vjob["runs"] == {"1": n_val}
    assert not evaluate and tag == "validation-" and n_rounds == 9 and vjob["warmup"] == 3
    timed = plan[3:].ravel()
    assert sorted(timed.tolist()) == list(range(n_test, n_test + n_val))  # each validation text once, no test text
    assert plan.min() >= n_test
    assert got["calls"] == n_val and got["batch"] == 1 and got["examples"] == n_val
    assert set(got["cases"]) == {"edgekd-onnx", "edgekd-onnx-int8"} and got["cases"]["edgekd-onnx"]["1"]["p50_ms"] == 1.0
    # Never more calls than the test timing makes at that batch size; nothing to time without candidates.
    sent.clear()
    assert compare_tools._time_on_validation(specs, job, arrays, segments, 1, 4, 0, tmp_path, 1, 60, 9, False)["calls"] == 4
    assert compare_tools._time_on_validation([], job, arrays, segments, 1, 4, 0, tmp_path, 1, 60, 9, False) is None
    assert compare_tools._time_on_validation(specs, job, arrays, {"test": (0, 10, None)}, 1, 4, 0, tmp_path, 1, 60, 9,
                                             False) is None


def test_verdict_all_needs_every_usual_path_and_the_accuracy_bars(tools):
    _, rep, _ = tools
    student = {**_row("student-fp32", "student", acc=0.80), "ood_accuracy": 0.70}
    refs = [_row("optimum-onnx-int8", "optimum", acc=0.79, p50s={1: 3.0}, label="Optimum"),
            _row("openvino-nncf-int8", "openvino", acc=0.80, p50s={1: 4.0}, label="OpenVINO")]
    best = {**_row("edgekd-onnx-int8", acc=0.798, p50s={1: 1.5}, label="edgekd"), "ood_accuracy": 0.69}
    v = rep.verdict_all(best, refs, student, [1], 1.5)
    assert not v["met"] and "OpenVINO" in v["summary"]  # 2x faster than both, but less accurate than OpenVINO
    refs[1]["accuracy"] = 0.79
    v = rep.verdict_all(best, refs, student, [1], 1.5)
    assert v["met"] and v["summary"].startswith("MET")
    best["ood_accuracy"] = 0.60  # keeps 85.7% of the student's OOD accuracy
    v = rep.verdict_all(best, refs, student, [1], 1.5)
    assert not v["met"] and any("keeps 85.7%" in line for line in v["lines"])


def test_verdict_all_a_missing_accuracy_figure_is_not_shown_and_not_met(tools):
    """A student row that failed, or an out-of-domain figure that is missing, is a NOT SHOWN line and the
    bar is not met: the summary never claims a clause nothing checked. Only --ood none (``ood_skipped``)
    leaves the out-of-domain bar out, and then out of the summary too."""
    _, rep, _ = tools
    refs = [_row(n, "x", acc=0.83, p50s={1: 2.0}, label=n)
            for n in ("optimum-onnx-int8", "openvino-nncf-int8", "torchao-int8-compiled")]
    best = {**_row("edgekd-onnx-int8", acc=0.84, p50s={1: 0.5}, label="edgekd"), "ood_accuracy": None}
    failed_student = {"name": "student-fp32", "status": "error", "accuracy": None, "ood_accuracy": None}
    v = rep.verdict_all(best, refs, failed_student, [1], 1.5)
    assert not v["met"] and v["summary"].startswith("NOT MET")
    shown = [line for line in v["lines"] if line.startswith("NOT SHOWN")]
    assert len(shown) == 2 and "fp32 student's test accuracy" in shown[0] and "out-of-domain" in shown[1]
    student = {**_row("student-fp32", "student", acc=0.84), "ood_accuracy": 0.70}
    v = rep.verdict_all(best, refs, student, [1], 1.5)  # the OOD figure of the best artifact alone is missing
    assert not v["met"] and "NOT SHOWN: the best artifact's out-of-domain accuracy is missing" in v["summary"]
    # --ood none: no out-of-domain bar, in the lines or in the summary.
    v = rep.verdict_all(best, refs, student, [1], 1.5, ood_skipped=True)
    assert v["met"] and v["summary"].startswith("MET") and "within 0.5 pp of the fp32 student" in v["summary"]
    assert "97%" not in v["summary"] and not any("out of domain" in line for line in v["lines"])
    v = rep.verdict_all(best, refs, failed_student, [1], 1.5, ood_skipped=True)
    assert not v["met"] and any(line.startswith("NOT SHOWN") for line in v["lines"])


def test_verdict_all_decides_the_accuracy_bars_on_counts(tools):
    """0.5 points below the student on 2,000 texts, and 1,843 of 1,900 out of domain (97% exactly), are met;
    a row's recorded counts ([right, scored]) decide over its floats."""
    _, rep, _ = tools
    refs = [_row("optimum-onnx-int8", "optimum", acc=0.80, p50s={1: 2.0}, label="Optimum")]
    best = {**_row("edgekd", acc=1670 / 2000, p50s={1: 1.0}), "ood_accuracy": 1843 / 1900}
    student = {**_row("student-fp32", "student", acc=1680 / 2000), "ood_accuracy": 1.0}
    v = rep.verdict_all(best, refs, student, [1], 1.5)
    assert v["met"], v["lines"]
    assert [line.split(":")[0] for line in v["lines"][-2:]] == ["MET", "MET"]
    best["counts"] = {"test": [1669, 2000], "ood": [1842, 1900]}  # one text worse on each: counts decide
    v = rep.verdict_all(best, refs, student, [1], 1.5)
    assert [line.split(":")[0] for line in v["lines"][-2:]] == ["NOT MET", "NOT MET"] and not v["met"]


def test_a_near_miss_prints_three_decimals(tools):
    _, rep, _ = tools
    opt = _row("optimum-onnx-int8", "optimum", acc=0.80, p50s={1: 1.497}, label="Optimum")
    best = _row("edgekd-onnx-int8", acc=0.80, p50s={1: 1.0}, label="edgekd")
    line = rep.verdict(best, opt, [1], 1.5)["lines"][0]
    assert line.startswith("NOT MET") and "only 1.497x faster (target 1.5x)" in line
    opt["cases"]["1"]["p50_ms"] = 1.503
    assert "is 1.503x faster" in rep.verdict(best, opt, [1], 1.5)["lines"][0]
    opt["cases"]["1"]["p50_ms"] = 3.0  # far from the bar: two decimals
    assert "is 3.00x faster" in rep.verdict(best, opt, [1], 1.5)["lines"][0]


def test_ablation_rows_follow_what_exists(tools):
    _, rep, _ = tools
    rows = [_row("teacher-fp32", "teacher", acc=0.85, p50s={1: 10.0}, size=400),
            _row("student-fp32", "student", acc=0.84, p50s={1: 5.0}, size=200),
            _row("pruned-student-fp32", "student", acc=0.83, p50s={1: 4.0}, size=120),
            _row("pruned-optimum-onnx-fp32", "optimum", acc=0.83, p50s={1: 2.0}),
            {**_row("edgekd-onnx", acc=0.83, p50s={1: 1.6}), "precision": "fp32",
             "meta": {"target": "onnx", "source_stage": "prune"}},
            {**_row("edgekd-onnx-int8", acc=0.82, p50s={1: 0.8}), "precision": "int8", "meta": {"target": "onnx"}},
            {**_row("edgekd-onnx-vocab", acc=0.82, p50s={1: 0.8}, size=50), "precision": "int8",
             "meta": {"target": "onnx", "derived_from": "onnx-int8", "step": "vocabulary trimming"}}]
    manifest = {"stages": {"quantize": {"metrics": {"method": "dynamic"}}, "vocab_trim": {"metrics": {}}}}
    table = {a["step"]: a for a in rep.ablation(rows, manifest, 1)}
    assert table["distill"]["speedup"] == pytest.approx(2.0) and table["distill"]["accuracy_delta"] == pytest.approx(-0.01)
    assert table["prune + recovery"]["speedup"] == pytest.approx(1.25)
    assert table["export + graph optimisation"]["from"] == "pruned-optimum-onnx-fp32"
    assert table["export + graph optimisation"]["speedup"] == pytest.approx(1.25)
    assert table["quantize (dynamic)"]["speedup"] == pytest.approx(2.0)
    assert table["vocabulary trimming"]["size_ratio"] == pytest.approx(0.5)
    assert "not timed" in table["vocab_trim"]["what"]
    # An export that computes the last block for the first position only says so in its step.
    rows[4]["meta"]["first_token_last_layer"] = {"applied": True}
    first = {a["step"]: a for a in rep.ablation(rows, manifest, 1)}
    assert "export + graph optimisation" not in first
    assert first["export (last block on the first position only)"]["speedup"] == pytest.approx(1.25)
    # A folder that leaves out SkipLayerNormFusion has a twin opened with ONNX Runtime's defaults: the export step
    # starts from the twin, the session step goes from the twin to the folder, and the twin is never "best".
    rows[4]["meta"]["first_token_last_layer"] = None
    rows[4]["meta"]["runtime_options"] = {"disabled_optimizers": ["SkipLayerNormFusion"]}
    twin = {**_row("edgekd-onnx-ort-defaults", acc=0.83, p50s={1: 1.8}), "precision": "fp32",
            "meta": {"target": "onnx", "source_stage": "prune", "session_baseline_of": "edgekd-onnx"}}
    tuned = {a["step"]: a for a in rep.ablation([*rows, twin], manifest, 1)}
    assert tuned["export + graph optimisation"]["to"] == "edgekd-onnx-ort-defaults"
    assert tuned["export + graph optimisation"]["speedup"] == pytest.approx(2.0 / 1.8)
    session = tuned["ONNX Runtime session: SkipLayerNormFusion off"]
    assert (session["from"], session["to"]) == ("edgekd-onnx-ort-defaults", "edgekd-onnx")
    assert session["speedup"] == pytest.approx(1.8 / 1.6)
    assert tuned["quantize (dynamic)"]["from"] == "edgekd-onnx"  # the twin makes no quantize step of its own
    fast = _row("x", p50s={1: 0.1}, val_p50s={1: 0.1})
    fast_twin = {**twin, "cases": fast["cases"], "val_cases": fast["val_cases"], "val_accuracy": 0.9}
    cands = [{**r, "val_accuracy": 0.9, "val_cases": r["cases"]} if r["name"] == "edgekd-onnx-int8" else r
             for r in rows]
    picked, _ = rep.select_best([*cands, fast_twin], 0.9, 0.01, 1, key="val_accuracy")
    assert picked == "edgekd-onnx-int8"  # the twin is faster here, and still not chosen
    # A step whose model was not measured has no row.
    rows = [r for r in rows if r["name"] != "pruned-student-fp32"]
    assert "prune + recovery" not in {a["step"] for a in rep.ablation(rows, {}, 1)}


def test_artifact_keeps_the_folders_its_ablation_starts_from(tools, tmp_path):
    """--artifact onnx-int8 measures onnx-int8 and the fp32 onnx folder its quantize step starts from
    (so the ablation has that row), and no other folder; a folder that names derived_from brings it."""
    compare_tools = tools[0]
    export = tmp_path / "run" / "export"
    metas = {"onnx": {"target": "onnx", "exporter": "onnx"},
             "onnx-int8": {"target": "onnx-int8", "exporter": "onnx", "precision": "int8-dynamic"},
             "executorch": {"target": "executorch"},
             "onnx-fp16": {"target": "onnx-fp16", "exporter": "onnx", "precision": "fp16"},
             "onnx-int8-small": {"target": "onnx", "exporter": "onnx", "precision": "int8-dynamic",
                                 "derived_from": "onnx-int8", "step": "shrink"}}
    for name, meta in metas.items():
        (export / name).mkdir(parents=True)
        (export / name / "artifact.json").write_text(json.dumps({**meta, "file": "model.onnx"}))
    names = lambda artifact: {e["name"] for e in compare_tools._export_entries(tmp_path / "run", artifact)}  # noqa: E731
    assert names("onnx-int8") == {"onnx-int8", "onnx"}
    assert names("onnx") == {"onnx"}
    assert names("executorch") == {"executorch"}
    assert names("onnx-int8-small") == {"onnx-int8-small", "onnx-int8", "onnx"}
    assert names(None) == set(metas)


def test_a_pick_that_is_not_the_shipped_folder_is_said(tools):
    _, rep, _ = tools
    data = {"best": {"name": "edgekd-onnx", "why": "w", "shipped": "onnx-int8"}}
    assert "The run ships `onnx-int8`" in rep._shipped_note(data) and "--artifact onnx-int8" in rep._shipped_note(data)
    data["best"]["name"] = "edgekd-onnx-int8"
    assert rep._shipped_note(data) == ""
    data["best"].pop("shipped")  # an older compare.json
    assert rep._shipped_note(data) == ""


def test_markdown_refuses_rows_timed_on_different_inputs(tools):
    from edgekd.errors import StageError

    _, rep, _ = tools
    rows = [_row("optimum-onnx-int8", "optimum", p50s={1: 2.0}), _row("edgekd-onnx-int8", p50s={1: 1.0})]
    rows[0]["cases"]["1"]["inputs_sha256"] = "a" * 64
    rows[1]["cases"]["1"]["inputs_sha256"] = "b" * 64
    data = {"rows": rows, "settings": {"batch_sizes": [1]}}
    with pytest.raises(StageError, match="different inputs"):
        rep.markdown(data)


def test_verdict_says_plainly_when_the_target_is_missed(tools):
    _, rep, _ = tools
    opt = _row("optimum-onnx-int8", "optimum", acc=0.80, p50s={1: 3.0, 8: 12.0}, label="Optimum")
    fast = _row("edgekd-onnx-int8", acc=0.80, p50s={1: 2.0, 8: 9.0}, label="edgekd int8")
    v = rep.verdict(fast, opt, [1, 8])
    assert [c["speedup"] for c in v["checks"]] == [pytest.approx(1.5), pytest.approx(12 / 9)]
    assert v["met"] and v["summary"].startswith("MET")

    slow8 = _row("edgekd-onnx-int8", acc=0.80, p50s={1: 2.0, 8: 11.0}, label="edgekd int8")
    v = rep.verdict(slow8, opt, [1, 8])
    assert not v["met"] and v["summary"].startswith("NOT MET") and "batch 8" in v["summary"]
    assert "only 1.09x faster" in v["lines"][1]

    less_accurate = _row("edgekd-onnx-int8", acc=0.79, p50s={1: 1.0, 8: 4.0}, label="edgekd int8")
    v = rep.verdict(less_accurate, opt, [1, 8])
    assert not v["met"] and all("LESS accurate" in line for line in v["lines"])

    slower = _row("edgekd-onnx-int8", acc=0.81, p50s={1: 4.0, 8: 13.0}, label="edgekd int8")
    assert "SLOWER" in rep.verdict(slower, opt, [1])["lines"][0]

    broken = {**opt, "status": "error", "error": "optimum-cli export exited with 1"}
    v = rep.verdict(fast, broken, [1, 8])
    assert not v["met"] and "NOT SHOWN" in v["summary"] and "exited with 1" in v["summary"]
    assert not rep.verdict(None, opt, [1])["met"]


def test_pipeline_time_from_the_manifest(tools):
    _, rep, _ = tools
    manifest = {"stages": {"teacher": {"seconds": 60.0, "metrics": {"train_seconds": 50.0, "cache_seconds": 5.0}},
                           "distill": {"seconds": 30.0, "metrics": {"teacher_forward_per_step": False}},
                           "export": {"seconds": 10.0}}}
    p = rep.pipeline_time(manifest)
    assert p["total_seconds"] == 100.0 and p["teacher_share"] == pytest.approx(60.0)
    assert p["teacher_forward_per_step"] is False
    assert any("did not run the teacher again" in line for line in p["lines"])
    manifest["stages"]["distill"]["metrics"]["teacher_forward_per_step"] = True
    assert any("ran the teacher on every step" in line for line in rep.pipeline_time(manifest)["lines"])


def test_optimum_config_follows_the_cpu_flags(tools):
    _, _, opt = tools
    assert opt.choose_isa(["avx2", "avx512f", "avx512_vnni"], "x86_64")[0] == "avx512_vnni"
    assert opt.choose_isa(["avx2", "avx512f"], "x86_64")[0] == "avx512"
    assert opt.choose_isa(["sse4_2", "avx2"], "x86_64")[0] == "avx2"
    assert opt.choose_isa(["asimd"], "aarch64")[0] == "arm64"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """runs/tiny: tiny teacher and student, the export stage's onnx folder plus a dynamic-int8 copy, a
    manifest with the stages' timings and a recipe whose test split is rebuilt from a CSV."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.export.base import write_artifact_meta
    from edgekd.export.stage import export_all
    from edgekd.pipeline import create_context
    from edgekd.pruning.vocab import domain_token_ids, trim_vocabulary
    from edgekd.recipe import ExportConfig, parse_recipe
    from edgekd.runfolder import sha256_file
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport, classification_metrics
    from edgekd.testing import tiny_bert, write_sentiment_csv

    root = tmp_path_factory.mktemp("compare")
    csv = write_sentiment_csv(root / "reviews.csv", n=240, seed=1)
    run = root / "runs" / "tiny"
    tiny_bert(run / "teacher" / "model", num_layers=2, num_labels=2, seed=0)
    tiny_bert(run / "distill" / "model", num_layers=1, num_labels=2, seed=1)
    # A pruned student as the prune stage saves it: per-layer FFN widths in the config, which
    # optimum-cli cannot build (the Optimum rows export it through Optimum's Python exporter), and a
    # trimmed vocabulary (prune.trim_vocab): the tokens of a few texts only, so other words are split
    # differently or read as [UNK], and it reads other ids than the teacher and the distilled student.
    pruned = tiny_bert(run / "prune" / "model", num_layers=1, intermediate=48, num_labels=2, seed=2)
    tok = AutoTokenizer.from_pretrained(pruned)
    texts = [line.rsplit(",", 1)[0].strip('"') for line in csv.read_text().splitlines()[1:40]]
    keep = domain_token_ids(tok(texts)["input_ids"], tok, min_count=2)
    model, trimmed_tok = trim_vocabulary(AutoModelForSequenceClassification.from_pretrained(pruned), tok, keep)
    assert len(trimmed_tok) < len(tok)
    model.save_pretrained(pruned)
    trimmed_tok.save_pretrained(pruned)
    config = json.loads((pruned / "config.json").read_text())
    (pruned / "config.json").write_text(json.dumps({**config, "ffn_sizes_per_layer": [48]}))
    recipe = parse_recipe({"name": "tiny", "output_dir": str(root / "runs"),
                           "data": {"dataset": str(csv), "max_length": MAX_LEN},
                           "teacher": {"model": str(run / "teacher" / "model")},
                           "prune": {"enabled": True, "keep_params": 0.5, "trim_vocab": True},
                           "export": {"targets": ["onnx"]},
                           "quantize": {"enabled": True}})  # its manifest's quantize stage recommends onnx-int8
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    inputs, labels = create_context(recipe).parity_data(tokenizer=trimmed_tok)
    module = SequenceClassifierExport(model.eval()).eval()
    tok_files = [pruned / f for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                      "special_tokens_map.json")]
    records = export_all(module, TEXT_IO, ["onnx"], run / "export", ExportConfig(), inputs, labels,
                         classification_metrics, {"max_length": MAX_LEN, "source_stage": "prune"}, tok_files)
    assert records["onnx"]["built"], records
    fp32, int8 = run / "export" / "onnx", run / "export" / "onnx-int8"
    int8.mkdir()
    quantize_dynamic(str(fp32 / "model.onnx"), str(int8 / "model.onnx"), weight_type=QuantType.QInt8)
    meta = json.loads((fp32 / "artifact.json").read_text())
    meta.update(precision="int8", sha256=sha256_file(int8 / "model.onnx"),
                size_bytes=(int8 / "model.onnx").stat().st_size, files={}, parity=None)
    write_artifact_meta(int8, meta)
    (run / "manifest.json").write_text(json.dumps({"stages": {
        "teacher": {"status": "done", "seconds": 12.0,
                    "metrics": {"train_seconds": 10.0, "cache_seconds": 1.5, "cached_examples": 192}},
        "distill": {"status": "done", "seconds": 8.0, "metrics": {"teacher_forward_per_step": False}},
        "export": {"status": "done", "seconds": 4.0},
        # what the run ships (report.shipped_artifact): the int8 folder
        "quantize": {"status": "done", "seconds": 2.0,
                     "metrics": {"recommended": "quantized", "recommended_dir": str(int8)}},
    }}))
    return run, labels


@pytest.mark.slow  # optimum-cli export, a quantizer and eight measuring processes: about a minute
def test_compare_tiny_run_end_to_end(tools, tiny_run, tmp_path, capsys):
    compare_tools, rep, _ = tools
    run, labels = tiny_run
    out = tmp_path / "compare"
    # --no-memory: a memory process per row (13 here) is the slowest part; the memory child is tested
    # on its own below.
    # --one-process: a process per row and round (the default, tested below) would start 13 here.
    # No --runs: every test text is timed once at each batch size (ceil(n / 8) calls at batch 8).
    code = compare_tools.main([str(run), "--warmup", "3", "--threads", "1", "--out", str(out),
                               "--ood", "none", "--calibration", "20", "--torchao", "eager", "--no-memory",
                               "--one-process"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "compare.png"}
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == EXPECTED_ROWS
    for who in ("student", "pruned"):
        for step in ("export", "quantize", "openvino"):
            assert data["optimum"][who][step]["status"] == "ok", (who, step, data["optimum"][who][step])
    assert "export" in data["optimum"]["pruned"]["export"]["command"]  # the Python exporter, not the CLI
    assert data["settings"]["eval_examples"] == data["settings"]["test_examples"] == len(labels)
    calls = {"1": len(labels), "8": math.ceil(len(labels) / 8)}
    assert data["settings"]["runs"] == calls and not data["settings"]["runs_given"]
    assert f"{calls['8']} at batch 8 (every test text once at each batch size)" in printed
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0, name
        assert r["size_bytes"] is None or r["size_bytes"] > 0, name
        if "torchao" not in name:  # torchao reports its state_dict size from the memory process
            assert r["size_bytes"] > 0, name
        assert r["memory"] == {}, name  # --no-memory: not measured, not made up
        for b in ("1", "8"):
            c = r["cases"][b]
            assert c["runs"] == calls[b] and 0 < c["min_ms"] <= c["p50_ms"] <= c["p99_ms"] <= c["max_ms"], (name, c)
            assert c["throughput"] == pytest.approx(int(b) * 1000 / c["mean_ms"])
    # Every row was timed on the same plan of texts at each batch size, each on its own tokenizer's ids: the
    # untrimmed models (teacher, distilled student and the usual paths on it) on the original tokenizer's,
    # the others on the trimmed one's; one set of arrays per tokenizer.
    untrimmed = {"teacher-fp32", *USUAL}
    for b in ("1", "8"):
        assert len({r["cases"][b]["plan_sha256"] for r in rows.values()}) == 1
        for tok in ("original", "shipped"):
            group = {n: r for n, r in rows.items() if (n in untrimmed) == (tok == "original")}
            assert {r["cases"][b]["tokenizer"] for r in group.values()} == {tok}
            assert len({r["cases"][b]["inputs_sha256"] for r in group.values()}) == 1, (b, tok)
        assert rows["teacher-fp32"]["cases"][b]["inputs_sha256"] != rows["edgekd-onnx"]["cases"][b]["inputs_sha256"]
    assert data["ood"]["how"].startswith("no out-of-domain set")  # --ood none below
    assert rows["pruned-torchao-int8"]["info"]["quantized_linears"] > 0
    # Same model, different tools: the pruned student's exports score like the pruned student.
    for n in ("pruned-optimum-onnx-fp32", "edgekd-onnx"):
        assert abs(rows[n]["accuracy"] - rows["pruned-student-fp32"]["accuracy"]) <= 1 / len(labels) + 1e-9
    # The trimmed vocabulary: the same texts are another length in the two tokenizers' ids; the comparison
    # says how long each is on average, and how many differ, from the very arrays it timed.
    assert "trimmed" in data["settings"]["vocabulary"] and "Vocabulary: trimmed" in printed
    from transformers import AutoTokenizer

    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    ctx = create_context(load_recipe(run / "recipe.yaml"))
    own = {who: ctx.tokenized("test", AutoTokenizer.from_pretrained(run / stage / "model")).lengths
           for who, stage in (("original", "distill"), ("shipped", "prune"))}
    tokens = data["settings"]["tokenizers"]
    assert tokens["texts"] == len(labels)
    for who in ("original", "shipped"):
        assert tokens[who]["mean_tokens_per_text"] == pytest.approx(own[who].mean())
    assert tokens["texts_differing_in_length"] == int((own["original"] != own["shipped"]).sum())
    assert "rows timed on the same texts, each with its own tokenizer" in printed
    assert f"mean tokens per text: shipped {own['shipped'].mean():.2f}, original {own['original'].mean():.2f}" in printed
    assert rows["student-fp32"]["accuracy"] == pytest.approx(_own_ids_accuracy(run, "distill", len(labels)))
    assert rows["pruned-student-fp32"]["accuracy"] == pytest.approx(_own_ids_accuracy(run, "prune", len(labels)))
    assert abs(rows["optimum-onnx-fp32"]["accuracy"] - rows["student-fp32"]["accuracy"]) <= 1 / len(labels) + 1e-9
    assert rows["optimum-onnx-int8"]["size_bytes"] < rows["optimum-onnx-fp32"]["size_bytes"]
    assert data["environment"]["threads"]["requested"] == 1 and data["environment"]["cpu_flags"]
    assert data["environment"]["timing_process"]["threads"]["torch"] == 1
    assert data["environment"]["versions"]["optimum"]

    # Every ratio in the JSON is the ratio of the JSON's own figures.
    for ref, key in (("teacher-fp32", "vs_teacher"), ("optimum-onnx-int8", "vs_optimum_int8")):
        for name, r in rows.items():
            got = data["ratios"][key][name]
            for b in ("1", "8"):
                assert got["p50_speedup"][b] == pytest.approx(rows[ref]["cases"][b]["p50_ms"] / r["cases"][b]["p50_ms"])
            size = r["size_bytes"] / rows[ref]["size_bytes"] if r["size_bytes"] is not None else None
            assert got["size_ratio"] == pytest.approx(size)
            assert got["accuracy_delta"] == pytest.approx(r["accuracy"] - rows[ref]["accuracy"])

    best = data["best"]["name"]
    assert best in ("edgekd-onnx", "edgekd-onnx-int8") and rows[best]["best"]
    assert "chosen on validation (accuracy and latency)" in data["best"]["why"]
    # The choice read validation figures only: the candidates were timed on validation texts, on one plan
    # of calls (one sha256, not the test timing's), and the pick is the fastest there.
    on = data["best"]["chosen_on"]
    assert on["split"] == "validation" and on["latency"]["batch"] == 1
    n_val = data["settings"]["validation_examples"]
    assert on["latency"]["calls"] == min(n_val, calls["1"]) and on["latency"]["examples"] == n_val
    cands = [rows[n] for n in on["latency"]["models"]]
    assert best in on["latency"]["models"] and all(r["within_budget"] for r in cands)
    assert {n for n, r in rows.items() if "val_cases" in r} == set(on["latency"]["models"])
    assert len({r["val_cases"]["1"]["inputs_sha256"] for r in cands}) == 1
    assert cands[0]["val_cases"]["1"]["inputs_sha256"] != cands[0]["cases"]["1"]["inputs_sha256"]
    assert all(r["val_cases"]["1"]["runs"] == on["latency"]["calls"] for r in cands)
    assert rows[best]["val_cases"]["1"]["p50_ms"] == min(r["val_cases"]["1"]["p50_ms"] for r in cands)
    from edgekd.report import shipped_artifact
    from edgekd.runfolder import RunFolder

    assert data["best"]["shipped"] == shipped_artifact(RunFolder(run))[0] == "onnx-int8"  # the folder the run ships
    v = data["verdict"]
    usual = ("optimum-onnx-int8", "openvino-nncf-int8", "torchao-int8")
    assert [p["checks"][0]["optimum_p50_ms"] for p in v["parts"]] == [rows[n]["cases"]["1"]["p50_ms"] for n in usual]
    for part, ref in zip(v["parts"], usual, strict=True):
        for c in part["checks"]:
            speed = rows[ref]["cases"][str(c["batch"])]["p50_ms"] / rows[best]["cases"][str(c["batch"])]["p50_ms"]
            assert c["speedup"] == pytest.approx(speed)
            assert c["met"] == (speed >= 1.5 and rows[best]["accuracy"] >= rows[ref]["accuracy"])
    assert v["summary"].startswith("MET" if v["met"] else "NOT MET")
    steps = {a["step"] for a in data["ablation"]}
    assert {"distill", "prune + vocabulary trim + recovery", "quantize (int8)"} <= steps
    assert data["pipeline"]["teacher_forward_per_step"] is False and data["pipeline"]["total_seconds"] == 26.0

    # Text by text: each row's answers score its own accuracy, and the paired figures are theirs.
    for name, r in rows.items():
        assert len(r["test_predictions"]) == len(labels), name
        assert np.mean(np.asarray(r["test_predictions"]) == labels) == pytest.approx(r["accuracy"]), name
    assert data["test_labels"] == labels.tolist()  # the key seeds.py scores every seed's answers with
    assert set(data["paired"]) == {*usual, "student-fp32"}
    for name, pr in data["paired"].items():
        assert pr == rep.paired(rows[best]["test_predictions"], rows[name]["test_predictions"], labels.tolist())
        assert pr["diff_pp"] == pytest.approx(100 * (rows[best]["accuracy"] - rows[name]["accuracy"]))

    md = (out / "compare.md").read_text()
    assert "text by text" in md
    assert v["summary"] in md and v["summary"] in printed
    assert "chosen on the validation split alone" in md
    for r in rows.values():
        assert md.count(f"| {r['label']}") >= 3, r["label"]  # size table + one latency row per batch size
    assert "## Ablation" in md and "one plan of texts for every row and one set of arrays per tokenizer" in md


def _own_ids_accuracy(run: Path, stage: str, n: int) -> float:
    """Test accuracy of a run's stage model on its own tokenizer's ids, scored here directly."""
    import torch
    from transformers import AutoTokenizer

    from edgekd.pipeline import create_context
    from edgekd.pruning import load_pruned_model
    from edgekd.recipe import load_recipe

    ctx = create_context(load_recipe(run / "recipe.yaml"))
    test = ctx.tokenized("test", AutoTokenizer.from_pretrained(run / stage / "model"))
    batch = test.collate(np.arange(n))
    with torch.inference_mode():
        logits = load_pruned_model(run / stage / "model").eval()(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    return float((logits.argmax(-1).numpy() == batch["labels"]).mean())


def test_paired_counts_the_texts_each_model_alone_gets_right(tools):
    _, rep, _ = tools
    labels = [0, 1, 1, 0, 1, 0, 1, 1, 0, 0]
    a = [0, 1, 1, 0, 1, 0, 1, 0, 1, 1]  # right on 7: texts 0-6
    b = [0, 1, 0, 1, 0, 0, 1, 1, 0, 1]  # right on 6: 0, 1, 5, 6, 7, 8
    pr = rep.paired(a, b, labels)
    assert (pr["n"], pr["only_a_right"], pr["only_b_right"]) == (10, 3, 2)  # a alone: 2, 3, 4; b alone: 7, 8
    assert pr["diff_pp"] == pytest.approx(10.0)
    d = np.array([1 if i in (2, 3, 4) else -1 if i in (7, 8) else 0 for i in range(10)], float)
    half = 1.96 * np.sqrt(np.mean(d ** 2) - np.mean(d) ** 2) / np.sqrt(10)
    assert pr["ci95_pp"] == pytest.approx([100 * (d.mean() - half), 100 * (d.mean() + half)])
    # McNemar exact: 5 discordant texts, 2 the smaller side: 2 * P(X <= 2), X ~ Binomial(5, 1/2) = 2 * 16/32
    assert pr["mcnemar_p"] == pytest.approx(1.0)
    lopsided = rep.paired([1] * 10, [0] * 10, [1] * 10)
    assert lopsided["mcnemar_p"] == pytest.approx(2 / 2 ** 10) and lopsided["diff_pp"] == pytest.approx(100.0)
    assert rep.paired(a, a, labels)["mcnemar_p"] == 1.0 and rep.paired(a, a, labels)["diff_pp"] == 0.0
    assert rep.paired(a, None, labels) is None and rep.paired(a, b[:5], labels) is None


def test_errors_name_what_to_do(tools, tmp_path, capsys):
    from edgekd.recipe import Recipe
    from edgekd.testing import tiny_bert, write_sentiment_csv

    compare_tools, _, _ = tools
    assert compare_tools.main([str(tmp_path / "nowhere")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err

    run = tmp_path / "runs" / "bare"
    (run / "teacher" / "model").mkdir(parents=True)
    (run / "teacher" / "model" / "config.json").write_text("{}")
    (run / "recipe.yaml").write_text(Recipe(name="bare").to_yaml())
    assert compare_tools.main([str(run), "--out", str(tmp_path / "o")]) == 2
    assert "holds no export folders" in capsys.readouterr().err

    (run / "export" / "onnx-int8").mkdir(parents=True)
    (run / "export" / "onnx-int8" / "artifact.json").write_text(json.dumps({"target": "onnx", "file": "model.onnx"}))
    assert compare_tools.main([str(run), "--artifact", "tensorrt", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--artifact tensorrt" in err and "present: onnx-int8" in err
    assert compare_tools.main([str(run), "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err
    # A run that trimmed its vocabulary but has no pruned student has no trimmed tokenizer to feed.
    (run / "distill" / "model").mkdir(parents=True)
    tiny_bert(run / "distill" / "model", num_layers=1, num_labels=2)
    csv = write_sentiment_csv(tmp_path / "r.csv", n=40)
    (run / "recipe.yaml").write_text(Recipe(name="bare", data={"dataset": str(csv)},
                                            prune={"enabled": True, "keep_params": 0.5, "trim_vocab": True}).to_yaml())
    assert compare_tools.main([str(run), "--out", str(tmp_path / "o")]) == 2
    assert "holds no pruned student" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_student_and_optimum_rows(tools, tmp_path):
    from edgekd.errors import StageError

    compare_tools, _, _ = tools
    run = tmp_path / "run"
    for stage in ("teacher", "distill", "prune"):
        (run / stage / "model").mkdir(parents=True)
        (run / stage / "model" / "config.json").write_text("{}")
    exports = [{"name": "onnx", "folder": str(run / "export" / "onnx"), "target": "onnx", "precision": "fp32",
                "meta": {"source_stage": "prune"}}]
    # the usual tools start from the distilled student, even when edgekd's artifact was pruned
    assert compare_tools._student_dir(run) == (run / "distill" / "model", "distill")
    (run / "distill" / "model" / "config.json").unlink()
    with pytest.raises(StageError, match="run the distill stage"):
        compare_tools._student_dir(run)

    (run / "distill" / "model" / "config.json").write_text("{}")
    students = compare_tools._students(run)
    assert students == {"student": run / "distill" / "model", "pruned": run / "prune" / "model"}
    failed = {"student": {"export": {"status": "error", "error": "optimum-cli export exited with 1: boom"}},
              "pruned": {"export": {"status": "ok", "path": "p.onnx", "size_bytes": 1},
                         "quantize": {"status": "ok", "path": "q.onnx", "size_bytes": 1},
                         "openvino": {"status": "skipped", "error": "openvino not installed"}}}
    specs, skipped = compare_tools._specs(run, students, exports, failed)
    assert [s["name"] for s in specs] == [
        "teacher-fp32", "student-fp32", "torchao-int8-compiled", "pruned-student-fp32", "pruned-optimum-onnx-fp32",
        "pruned-optimum-onnx-int8", "pruned-torchao-int8-compiled", "edgekd-onnx"]
    # Dynamic int8 (Optimum's, and edgekd's int8-dynamic artifacts) is scored one text per call.
    assert {s["name"] for s in specs if s.get("rows_alone")} == {"pruned-optimum-onnx-int8"}
    int8 = [{"name": "onnx-int8", "folder": "f", "target": "onnx", "precision": "int8-dynamic"},
            {"name": "onnx-int8-static", "folder": "g", "target": "onnx", "precision": "int8-static"}]
    specs8, _ = compare_tools._specs(run, students, int8, failed)
    assert {s["name"]: s["rows_alone"] for s in specs8 if s["group"] == "edgekd"} == {
        "edgekd-onnx-int8": True, "edgekd-onnx-int8-static": False}
    # A folder that chose its ONNX Runtime session gets a twin row opened with the runtime's defaults.
    tuned = [{"name": "onnx-int8", "folder": "f", "target": "onnx", "precision": "int8-dynamic",
              "meta": {"runtime_options": {"disabled_optimizers": ["SkipLayerNormFusion"]}}}]
    twins = {s["name"]: s for s in compare_tools._specs(run, students, tuned, failed)[0] if s["group"] == "edgekd"}
    assert set(twins) == {"edgekd-onnx-int8", "edgekd-onnx-int8-ort-defaults"}
    assert twins["edgekd-onnx-int8-ort-defaults"]["runtime_options"] == {"disabled_optimizers": []}
    assert twins["edgekd-onnx-int8-ort-defaults"]["meta"]["session_baseline_of"] == "edgekd-onnx-int8"
    assert "runtime_options" not in twins["edgekd-onnx-int8"] and twins["edgekd-onnx-int8-ort-defaults"]["rows_alone"]
    specs, _ = compare_tools._specs(run, students, exports, failed, torchao_compile=False)
    assert "torchao-int8" in {s["name"] for s in specs}
    assert {s["name"]: s["error"] for s in skipped} == {
        "optimum-onnx-fp32": "optimum-cli export exited with 1: boom",
        "optimum-onnx-int8": "the step before it failed", "openvino-nncf-int8": "the step before it failed",
        "pruned-openvino-nncf-int8": "openvino not installed"}


@pytest.mark.slow  # inductor compiles C++: a minute or more on a loaded machine
def test_torchao_compiled_runner(tools, tmp_path):
    """The compiled torchao path loads, compiles on first use and gives the eager model's answers."""
    pytest.importorskip("torchao")
    import _compare_models as models

    from edgekd.testing import tiny_bert

    folder = tiny_bert(tmp_path / "m", num_layers=1, num_labels=2, seed=4)
    spec = {"kind": "torchao", "path": str(folder)}
    eager, _ = models.load(spec, 1)
    compiled, info = models.load({**spec, "compile": True}, 1)
    assert info["torch_compile"].startswith("torch.compile(dynamic=True)") and info["quantized_linears"] > 0
    x = {"input_ids": np.array([[2, 5, 6, 7, 3]], np.int64), "attention_mask": np.ones((1, 5), np.int64)}
    np.testing.assert_allclose(compiled.run(x)["logits"], eager.run(x)["logits"], atol=1e-3)
    y = {k: v[:, :4] for k, v in x.items()}  # another length: the same dynamic graph, no error
    assert compiled.run(y)["logits"].shape == (1, 2)


def test_worker_blocks_and_load_failures(tools, tmp_path):
    import _compare_worker as worker

    assert worker.blocks(6) == [(0, 6)]
    assert worker.blocks(200) == [(i * 20, (i + 1) * 20) for i in range(10)]
    spans = worker.blocks(37)
    assert spans[0][0] == 0 and spans[-1][1] == 37 and all(a < b for a, b in spans)
    models = worker._load_all([{"name": "gone", "kind": "artifact", "path": str(tmp_path / "gone")}], 1)
    assert models["gone"]["status"] == "error" and "artifact.json" in models["gone"]["error"]


def test_timing_rows_use_every_example_before_repeating(tools):
    compare_tools, _, _ = tools
    rows = compare_tools._timing_rows(10, 4, 2, 5, seed=0)
    assert rows.shape == (2 + 5, 4)
    timed = rows[2:].ravel()  # the warm-up batches come first and are drawn apart
    assert sorted(timed[:10]) == list(range(10)) and sorted(timed[10:20]) == list(range(10))
    assert np.array_equal(rows, compare_tools._timing_rows(10, 4, 2, 5, seed=0))
    # At batch 1 with one run per example (the default), each example is timed exactly once, however
    # many warm-up calls come first.
    for warmup in (0, 3, 25):
        once = compare_tools._timing_rows(10, 1, warmup, 10, seed=1)
        assert once.shape == (warmup + 10, 1) and sorted(once[warmup:, 0]) == list(range(10))
    # At batch 4, ceil(10 / 4) = 3 calls (the default there) time every example, the last call topped up
    # with two from the next pass.
    three = compare_tools._timing_rows(10, 4, 2, 3, seed=1)[2:].ravel()
    assert sorted(three[:10]) == list(range(10)) and len(three) == 12



def test_trimmed_run_times_and_scores_each_model_on_its_own_tokenizers_ids(tools, tmp_path):
    """A trimmed run: every model is timed on the same plan of texts, each on its own tokenizer's ids of
    them (a model marked ``vocab: original`` on the untrimmed tokenizer's, which split the texts into fewer
    tokens here), with no id mapping inside its timed calls; each row records the plan, its tokenizer and
    the sha256 of the arrays it was fed; scoring is on its own tokenizer's ids too."""
    import _compare_worker as worker
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgekd.devices import remote_runner
    from edgekd.testing import tiny_bert

    folder = tiny_bert(tmp_path / "m", num_layers=1, num_labels=2)
    vocab = AutoModelForSequenceClassification.from_pretrained(folder).config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (6, 8))  # the trimmed tokenizer's ids: every text 8 tokens
    own = rng.integers(5, vocab, (6, 8))  # the original tokenizer's ids of the same texts: 5 or 6 tokens
    own_lengths = np.array([5, 6, 5, 6, 5, 6])
    own_mask = (np.arange(8)[None, :] < own_lengths[:, None]).astype(np.int64)
    own = own * own_mask
    mask, lengths = np.ones((6, 8), np.int64), np.full(6, 8)
    rows_b2 = np.array([[0, 1], [2, 3], [4, 5], [1, 2]])
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask, lengths=lengths, orig_ids=own, orig_mask=own_mask,
             orig_lengths=own_lengths, eval_rows=np.arange(6), rows_b2=rows_b2)
    specs = [{"name": "untrimmed", "kind": "hf", "path": str(folder), "vocab": "original"},
             {"name": "untrimmed-twin", "kind": "hf", "path": str(folder), "vocab": "original"},
             {"name": "trimmed", "kind": "hf", "path": str(folder)}]
    job = {"models": specs, "threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [2], "inputs": "inputs.npz",
           "eval_batch_size": 4}
    result, outputs = worker.timing(job, tmp_path)

    m = result["models"]
    cases = {name: m[name]["cases"][0] for name in m}
    assert all(m[name]["status"] == "ok" for name in m)
    assert len({c["plan_sha256"] for c in cases.values()}) == 1  # the same texts, order and batches for every row
    assert [cases[n]["tokenizer"] for n in ("untrimmed", "untrimmed-twin", "trimmed")] == ["original", "original", "shipped"]

    def fed(ids_, mask_, lengths_):  # the arrays of the plan's timed calls, each batch cut to its longest text
        calls = []
        for r in rows_b2[1:]:
            w = int(lengths_[r].max())
            calls.append({"input_ids": ids_[r, :w], "attention_mask": mask_[r, :w]})
        return remote_runner.inputs_sha256(calls)

    assert cases["untrimmed"]["inputs_sha256"] == cases["untrimmed-twin"]["inputs_sha256"] == fed(own, own_mask, own_lengths)
    assert cases["trimmed"]["inputs_sha256"] == fed(ids, mask, lengths)
    assert cases["untrimmed"]["mean_tokens_per_item"] == pytest.approx(own_lengths[rows_b2[1:]].mean())
    assert cases["trimmed"]["mean_tokens_per_item"] == 8.0
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        def logits(x, mk):
            return model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(mk)).logits.numpy()

        np.testing.assert_allclose(outputs["untrimmed"], logits(own, own_mask), atol=1e-5)
        np.testing.assert_allclose(outputs["trimmed"], logits(ids, mask), atol=1e-5)
    # A model that reads the original ids in a comparison without them is an error, not fed the shipped ids.
    np.savez(tmp_path / "shipped-only.npz", ids=ids, mask=mask, lengths=lengths, eval_rows=np.arange(6),
             rows_b2=rows_b2)
    # (threads None: torch's threads were pinned by the first call, once per process)
    result, _ = worker.timing({**job, "inputs": "shipped-only.npz", "evaluate": False, "threads": None}, tmp_path)
    assert "inputs_sha256" not in result["models"]["untrimmed"]["cases"][0]
    assert "no original tokenizer's ids" in result["models"]["untrimmed"]["cases"][0]["error"]


def test_markdown_refuses_rows_of_one_tokenizer_fed_other_arrays_or_another_plan(tools):
    """Rows of two tokenizers, fed two sets of arrays for one plan of texts: shown side by side, and the header
    says the texts are the same, each row on its own tokenizer's ids, with each tokenizer's mean tokens per
    text. Two rows of one tokenizer fed different arrays, or any row timed on another plan, are refused."""
    from edgekd.errors import StageError

    _, rep, _ = tools

    def rows(over=None):
        out = [_row("teacher-fp32", "teacher", p50s={1: 8.0}), _row("optimum-onnx-int8", "optimum", p50s={1: 2.0}),
               _row("edgekd-onnx-int8", p50s={1: 1.0})]
        for r, tok in zip(out, ("original", "original", "shipped"), strict=True):
            r["cases"]["1"].update(tokenizer=tok, inputs_sha256=("o" if tok == "original" else "s") * 64,
                                   plan_sha256="p" * 64)
        for (name, key), value in (over or {}).items():
            next(r for r in out if r["name"] == name)["cases"]["1"][key] = value
        return out

    data = _markdown_data(rep, rows())
    data["settings"].update(inputs="the same test texts", tokenizers={
        "texts": 10, "shipped": {"mean_tokens_per_text": 27.5}, "original": {"mean_tokens_per_text": 26.25},
        "texts_differing_in_length": 3})
    text = rep.markdown(data)
    assert "rows timed on the same texts, each with its own tokenizer" in text
    assert "mean tokens per text: shipped 27.50, original 26.25" in text and "3 of 10 texts differ in length" in text
    assert "original tokenizer oooo" in text and "shipped tokenizer ssss" in text
    with pytest.raises(StageError, match="of the original tokenizer timed on different inputs"):
        rep.markdown({**data, "rows": rows({("optimum-onnx-int8", "inputs_sha256"): "x" * 64})})
    with pytest.raises(StageError, match="different texts"):
        rep.markdown({**data, "rows": rows({("edgekd-onnx-int8", "plan_sha256"): "q" * 64})})
    with pytest.raises(StageError, match="different texts"):  # two tokenizers, and a row that records no plan
        rep.markdown({**data, "rows": rows({("teacher-fp32", "plan_sha256"): None})})


def test_memory_child_measures_each_kind(tools, tiny_run, tmp_path):
    """The memory child, one fresh process per model as in a real comparison: RSS after load and at
    the peak, and torchao's checkpoint size (an untrimmed model of a trimmed run runs on its own
    tokenizer's ids too)."""
    compare_tools, _, _ = tools
    run, _ = tiny_run
    ids = np.array([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]], np.int64)
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=(ids > 0).astype(np.int64), lengths=np.array([5, 3]),
             rows_b1=np.array([[0], [1]]), orig_ids=ids[:, :4], orig_mask=(ids[:, :4] > 0).astype(np.int64),
             orig_lengths=np.array([4, 3]))
    specs = [{"name": "student", "kind": "hf", "path": str(run / "distill" / "model"), "vocab": "original"},
             {"name": "torchao", "kind": "torchao", "path": str(run / "prune" / "model")},
             {"name": "edgekd", "kind": "artifact", "path": str(run / "export" / "onnx-int8"),
              "file": "model.onnx"}]
    for spec in specs:
        job = {"spec": spec, "threads": 1, "inputs": "inputs.npz", "batch_sizes": [1], "rounds": 2}
        res, _ = compare_tools._child("memory", job, tmp_path, spec["name"], 1, 600)
        assert res["status"] == "ok" and res["calls"] == 2, (spec["name"], res)
        assert res["load_delta_mb"] is not None and res["peak_rss_mb"] > 0, spec["name"]
        assert ("size_bytes" in res) == (spec["kind"] == "torchao"), spec["name"]
    assert res["preloaded"] == ["onnxruntime", "edgekd.export.stage"]


def test_a_teacher_with_another_vocabulary_is_refused(tools, tmp_path):
    """Every untrimmed row, the teacher's too, is fed the distilled student's token ids: a teacher whose
    vocabulary differs would read them as other tokens, so the comparison stops and says why."""
    import types

    from edgekd.errors import StageError

    compare_tools, _, _ = tools
    vocabs = {"teacher": {"[PAD]": 0, "film": 1}, "student": {"[PAD]": 0, "movie": 1}}
    task = types.SimpleNamespace(load_tokenizer=lambda p: types.SimpleNamespace(get_vocab=lambda: vocabs[Path(p).name]))
    ctx = types.SimpleNamespace(task=task)
    recipe = types.SimpleNamespace(prune=types.SimpleNamespace(enabled=False, trim_vocab=False))
    with pytest.raises(StageError, match="different vocabularies"):
        compare_tools._tokenizers(ctx, recipe, {"student": tmp_path / "student"}, tmp_path / "teacher")
    vocabs["teacher"] = vocabs["student"]
    tokens = compare_tools._tokenizers(ctx, recipe, {"student": tmp_path / "student"}, tmp_path / "teacher")
    assert tokens.table is None and tokens.shipped is tokens.original


def test_worker_times_its_rounds_slice_and_evaluates_when_asked(tools, tmp_path, monkeypatch):
    """A timing child in a round: its warm-up calls, then exactly the timed calls of its slice of the
    plan (``call_offset``); the sha256 of the whole plan's timed calls, the same in every round; no
    scoring unless the job asks for it."""
    import _compare_worker as worker

    seen, timed = [], []

    class Recorder:
        input_names = ["input_ids", "attention_mask"]

        def run(self, x):
            seen.append(int(x["input_ids"][0, 0]))
            return {"logits": np.zeros((len(x["input_ids"]), 2), np.float32)}

    def timed_call(runner, x):
        timed.append(int(x["input_ids"][0, 0]))
        runner.run(x)
        return 0.001, 0.001

    monkeypatch.setattr(worker, "preload", lambda spec: [])
    monkeypatch.setattr(worker, "load", lambda spec, threads: (Recorder(), {}))
    monkeypatch.setattr(worker, "timed_call", timed_call)
    n = 12
    ids = np.arange(100, 100 + n).reshape(n, 1)  # row i starts with token 100 + i: the call is readable
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=np.ones_like(ids), lengths=np.ones(n, np.int64),
             eval_rows=np.arange(4), rows_b1=np.arange(n).reshape(n, 1))
    job = {"models": [{"name": "m", "kind": "artifact", "path": "x", "file": "model.onnx"}], "threads": 1, "warmup": 2, "runs": 3,
           "batch_sizes": [1], "inputs": "inputs.npz", "eval_batch_size": 4}
    shas, plans = [], []
    for offset in (0, 3, 6):
        seen.clear()
        timed.clear()
        result, outputs = worker.timing({**job, "call_offset": offset, "evaluate": offset == 0}, tmp_path)
        case = result["models"]["m"]["cases"][0]
        assert seen[:2] == [100, 101]  # the warm-up calls first
        assert timed == [100 + 2 + offset + i for i in range(3)], (offset, timed)
        assert case["runs"] == 3 and len(case["times_ms"]) == len(case["cpu_times_ms"]) == 3
        assert ("m" in outputs) == (offset == 0)
        shas.append(case["inputs_sha256"])
        plans.append(case["plan_sha256"])
        assert case["tokenizer"] == "shipped" and case["mean_tokens_per_item"] == 1.0
    assert len(set(shas)) == 1 and len(set(plans)) == 1
    assert plans[0] == worker.plan_sha256(np.arange(n).reshape(n, 1)[2:])
    with pytest.raises(ValueError, match="no room"):
        worker.timing({**job, "call_offset": 8}, tmp_path)
    # Per batch size: each batch size's own slice (batch 2 plans 6 calls of two rows).
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=np.ones_like(ids), lengths=np.ones(n, np.int64),
             eval_rows=np.arange(4), rows_b1=np.arange(n).reshape(n, 1), rows_b2=np.arange(n).reshape(6, 2))
    timed.clear()
    result, _ = worker.timing({**job, "batch_sizes": [1, 2], "runs": {"1": 3, "2": 1},
                               "call_offset": {"1": 6, "2": 3}, "evaluate": False}, tmp_path)
    assert [c["runs"] for c in result["models"]["m"]["cases"]] == [3, 1]
    assert timed == [108, 109, 110, 110], timed


def test_worker_warms_every_shape_of_its_slice_before_the_clock(tools, tmp_path, monkeypatch):
    """A runtime that sets up per input shape (OpenVINO) pays it at the first call of each new length: each
    model runs one call of every distinct shape of its round's slice, untimed, before its first timed call,
    whatever shapes the warm-up calls happened to have; every model alike."""
    import _compare_worker as worker

    log: list[tuple[str, str, tuple]] = []

    class Recorder:
        input_names = ["input_ids", "attention_mask"]

        def __init__(self, name):
            self.name = name

        def run(self, x):
            log.append((self.name, "run", x["input_ids"].shape))
            return {"logits": np.zeros((len(x["input_ids"]), 2), np.float32)}

    def timed_call(runner, x):
        log.append((runner.name, "timed", x["input_ids"].shape))
        return 0.001, 0.001

    monkeypatch.setattr(worker, "preload", lambda spec: [])
    monkeypatch.setattr(worker, "load", lambda spec, threads: (Recorder(spec["name"]), {}))
    monkeypatch.setattr(worker, "timed_call", timed_call)
    # Rows 0-1 (the warm-up calls) one token long; the timed rows 2..9 of lengths 2..5, never seen in warm-up.
    lengths = np.array([1, 1, 2, 3, 4, 5, 2, 3, 4, 5])
    n = len(lengths)
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(tmp_path / "inputs.npz", ids=mask * 7, mask=mask, lengths=lengths, eval_rows=np.arange(n),
             rows_b1=np.arange(n).reshape(n, 1))
    models = [{"name": "a", "kind": "artifact", "path": "x", "file": "m.onnx"},
              {"name": "b", "kind": "artifact", "path": "y", "file": "m.onnx"}]
    job = {"models": models, "threads": 1, "warmup": 2, "runs": 4, "batch_sizes": [1], "inputs": "inputs.npz",
           "eval_batch_size": 4, "evaluate": False}
    for offset in (0, 4):  # two rounds, each on its own slice (lengths 2-5, then 2-5 again in another order)
        log.clear()
        result, _ = worker.timing({**job, "call_offset": offset}, tmp_path)
        for name in ("a", "b"):
            calls = [(kind, shape) for who, kind, shape in log if who == name]
            first_timed = next(i for i, (kind, _) in enumerate(calls) if kind == "timed")
            slice_shapes = {(1, int(w)) for w in lengths[2 + offset:2 + offset + 4]}
            assert {shape for kind, shape in calls if kind == "timed"} == slice_shapes
            assert slice_shapes <= {shape for kind, shape in calls[:first_timed] if kind == "run"}, (name, calls)
            assert result["models"][name]["cases"][0]["shapes_warmed"] == len(slice_shapes)


def test_worker_scores_dynamic_int8_one_text_per_call_at_its_own_length(tools, tmp_path, monkeypatch):
    """A dynamic-int8 model's answer for a text depends on the other texts of the call (one activation
    scale per call), and it is served one text per call: it is scored so, every other model in batches."""
    import _compare_worker as worker

    calls: dict[str, list[tuple[int, int]]] = {"alone": [], "batched": []}

    class Recorder:
        input_names = ["input_ids", "attention_mask"]

        def __init__(self, name):
            self.name = name

        def run(self, x):
            if scoring:
                calls[self.name].append(x["input_ids"].shape)
            return {"logits": np.zeros((len(x["input_ids"]), 2), np.float32)}

    scoring = []  # non-empty while the worker scores (its timed calls are not recorded)
    evaluate = worker._evaluate

    def scored(*args):
        scoring.append(True)
        try:
            return evaluate(*args)
        finally:
            scoring.clear()

    monkeypatch.setattr(worker, "_evaluate", scored)
    monkeypatch.setattr(worker, "preload", lambda spec: [])
    monkeypatch.setattr(worker, "load", lambda spec, threads: (Recorder(spec["name"]), {}))
    lengths = np.array([3, 1, 4, 2, 5, 2])
    n = len(lengths)
    ids = np.zeros((n, 5), np.int64)
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask, lengths=lengths, eval_rows=np.arange(n),
             rows_b1=np.arange(n).reshape(n, 1))
    models = [{"name": "alone", "kind": "artifact", "path": "x", "file": "m.onnx", "rows_alone": True},
              {"name": "batched", "kind": "artifact", "path": "y", "file": "m.onnx"}]
    job = {"models": models, "threads": 1, "warmup": 1, "runs": 2, "batch_sizes": [1], "inputs": "inputs.npz",
           "eval_batch_size": 4}
    worker.timing(job, tmp_path)
    assert sorted(calls["alone"]) == sorted((1, int(w)) for w in lengths)
    assert [b for b, _ in calls["batched"]] == [4, 2]


@pytest.mark.slow  # four measuring processes
def test_rounds_time_each_model_alone_on_its_slice(tools, tiny_run, tmp_path):
    """The default timing: every model in its own process per round, each round on the next slice of
    the calls; the timed calls pooled, scored once (in the first round), one sha256 for every row."""
    compare_tools, _, _ = tools
    run, _ = tiny_run
    ids = np.array([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0]], np.int64)
    # Batch 1: 4 timed calls; batch 2: 2 (each text once at each batch size, as compare() plans them).
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=(ids > 0).astype(np.int64), lengths=np.array([5, 3, 4]),
             eval_rows=np.arange(3), rows_b1=compare_tools._timing_rows(3, 1, 2, 4, seed=0),
             rows_b2=compare_tools._timing_rows(3, 2, 2, 2, seed=0))
    specs = [{"name": "student", "kind": "hf", "path": str(run / "distill" / "model")},
             {"name": "edgekd", "kind": "artifact", "path": str(run / "export" / "onnx"), "file": "model.onnx"}]
    job = {"models": specs, "threads": 1, "warmup": 2, "runs": {"1": 4, "2": 2}, "batch_sizes": [1, 2],
           "inputs": "inputs.npz", "eval_batch_size": 2}
    timing, outputs = compare_tools._time_in_rounds(specs, job, tmp_path, 1, 600, rounds=2)
    assert timing["rounds"] == 2 and timing["process"] == "one per model and round"
    for name in ("student", "edgekd"):
        m = timing["models"][name]
        assert m["status"] == "ok", m
        for c, runs in zip(m["cases"], (4, 2), strict=True):
            assert c["runs"] == runs and c["rounds"] == 2 and "times_ms" not in c and c["cpu_p50_ms"] > 0
        assert outputs[name].shape == (3, 2)
        for r, (offset_b1, offset_b2) in enumerate(((0, 0), (2, 1))):
            sent = json.loads((tmp_path / f"timing-{name}-r{r}.json").read_text())
            assert [s["name"] for s in sent["models"]] == [name]  # alone in its process
            assert sent["call_offset"] == {"1": offset_b1, "2": offset_b2}
            assert (sent["runs"], sent["evaluate"]) == ({"1": 2, "2": 1}, r == 0)
            got = json.loads((tmp_path / f"timing-{name}-r{r}.result.json").read_text())
            cases = got["models"][name]["cases"]
            assert list(got["models"]) == [name] and [len(c["times_ms"]) for c in cases] == [2, 1]
    for i in range(2):
        assert (timing["models"]["student"]["cases"][i]["inputs_sha256"]
                == timing["models"]["edgekd"]["cases"][i]["inputs_sha256"])
    # Each process started ahead of its turn (as edgekd bench's): a fresh one per model and round, none of
    # them still importing its runtime while another was let go and timed.
    spans = timing["processes"]
    assert sorted((p["model"], p["round"]) for p in spans) == [("edgekd", 0), ("edgekd", 1), ("student", 0),
                                                                ("student", 1)]
    assert len({p["pid"] for p in spans}) == 4
    assert all(p["started_at"] <= p["ready_at"] <= p["go_at"] <= p["ended_at"] for p in spans)
    assert measure.imports_overlapping_timing(spans) == []
    # compare.json keeps them, and compare.md says so.
    _, rep, _ = tools
    assert compare_tools._timing_record(timing)["processes"] == spans
    assert "imported its runtime while no model was timed" in rep._processes(compare_tools._timing_record(timing))
    with pytest.raises(compare_tools.EdgeKDError, match="one-process"):
        compare_tools.compare(run, tmp_path / "x", one_process=True, rounds=3)


def test_a_timing_process_started_ahead_imports_then_waits_for_its_turn(tools, tmp_path):
    """compare_tools' timing processes started ahead (``measure.Prestarted`` with its spawn): each imports
    its models' runtimes, says it is ready and loads nothing until let go; one not wanted is stopped having
    written nothing; one let go runs the job and reports its own error."""
    compare_tools, _, _ = tools

    def job(name):
        spec = {"name": name, "kind": "artifact", "path": str(tmp_path / "nowhere"), "file": "model.onnx"}
        return {"name": f"{name}-r0", "models": [spec], "threads": 1, "warmup": 1, "runs": {"1": 1},
                "batch_sizes": [1], "inputs": f"inputs-{name}.npz", "evaluate": False}

    a, b = job("a"), job("b")
    with measure.Prestarted(tmp_path, timeout_s=120, width=2, spawn=compare_tools._timing_spawn) as ahead:
        ahead.plan([a, b])
        result, outputs = ahead.run(a)
        assert result["status"] == "error" and "inputs-a.npz" in result["error"] and outputs is None
        assert set(result["process"]) == {"pid", "ready_at", "go_at", "started_at", "ended_at"}  # its span, kept
        waiting = ahead.started["b-r0"]
        # Started with a, imported, idle: still running, nothing written, until let go or stopped.
        assert waiting.ready and waiting.proc.poll() is None
        assert json.loads((tmp_path / "timing-b-r0.json").read_text()) == b
    assert waiting.proc.returncode is not None and not (tmp_path / "timing-b-r0.result.json").exists()


def test_markdown_says_how_the_models_shared_processes(tools):
    _, rep, _ = tools
    waited = [{"started_at": 0, "ready_at": 1, "go_at": 1, "ended_at": 3},
              {"started_at": 0, "ready_at": 1, "go_at": 3, "ended_at": 4}]
    text = rep._processes({"rounds": 1, "process": "one per model and round", "processes": waited})
    assert "imported its runtime while no model was timed" in text
    late = [waited[0], {"started_at": 0, "ready_at": 2, "go_at": 3, "ended_at": 4}]  # importing until 2, the first timed 1-3
    text = rep._processes({"rounds": 1, "process": "one per model and round", "processes": late})
    assert "1 of 2 were still importing their runtime while another model was timed" in text
    assert "its own process, in 3 rounds" in rep._processes({"rounds": 3, "process": "one per model and round"})
    assert rep._processes({"rounds": 1, "process": "one for every model"}).startswith("every model in one process")
    assert rep._processes({}).startswith("every model in one process")  # a compare.json from before rounds


def test_markdown_says_whether_the_artifact_was_named_or_chosen(tools):
    _, rep, _ = tools
    named = {"settings": {"validation_examples": 1275}, "best": {"why": "chosen with --artifact onnx-int8"}}
    assert rep._choice(named).startswith("the edgekd artifact is the one named with --artifact, not chosen here")
    chosen = {"settings": {"validation_examples": 1275}, "best": {"why": "the fastest at p50 within budget"}}
    assert rep._choice(chosen) == "the best artifact is chosen on 1275 validation examples"  # an older compare.json
    chosen["best"]["chosen_on"] = {"split": "validation", "latency": {"batch": 1, "calls": 1275}}
    assert rep._choice(chosen) == ("the best artifact is chosen on the validation split alone: accuracy on 1275 "
                                   "validation examples, p50 at batch 1 over 1,275 timed calls on validation texts; "
                                   "the test figures only report")


def test_markdown_refuses_candidates_timed_on_different_validation_inputs(tools):
    from edgekd.errors import StageError

    _, rep, _ = tools
    rows = [_row("teacher-fp32", "teacher", p50s={1: 8.0}), _row("edgekd-onnx", p50s={1: 2.0}, val_p50s={1: 2.0}),
            _row("edgekd-onnx-int8", p50s={1: 1.0}, val_p50s={1: 1.0})]
    rep.markdown(_markdown_data(rep, rows))
    rows[2]["val_cases"]["1"]["inputs_sha256"] = "w" * 64
    with pytest.raises(StageError, match="validation timing the best artifact is chosen on"):
        rep.markdown(_markdown_data(rep, rows))


def test_markdown_refuses_rows_that_ran_on_other_thread_counts(tools):
    from edgekd.errors import StageError

    _, rep, _ = tools
    rows = [_row("teacher-fp32", "hf", p50s={1: 8.0}), _row("edgekd-onnx-int8", p50s={1: 0.5})]
    rows[0]["runtime_info"], rows[1]["runtime_info"] = {"threads": 1}, {"threads": 2}
    with pytest.raises(StageError, match="teacher-fp32: 1"):
        rep.check_same_threads(rows, 2)
    rows[0]["runtime_info"] = {"threads": 2}
    rep.check_same_threads(rows, 2)
    rows[0]["runtime_info"] = {}  # a runtime that does not say its threads
    rep.check_same_threads(rows, 2)


def test_pytorch_rows_record_the_threads_torch_runs_on():
    torch = pytest.importorskip("torch")
    from edgekd.devices import remote_runner
    from edgekd.devices.torch_runner import TorchRunner
    from edgekd.export.base import ModelIO

    runner = TorchRunner(torch.nn.Identity(), ModelIO.from_dict({"input_names": ["x"], "output_names": ["y"]}))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert remote_runner.runtime_info(runner)["threads"] == 1
    finally:
        torch.set_num_threads(before)


def _markdown_data(rep, rows, batch_sizes=(1,), ablation_batch=None):
    settings = {"threads": 2, "warmup": 20, "runs": {str(b): 10 for b in batch_sizes}, "eval_examples": 10,
                "validation_examples": 10, "optimum_isa": "avx2", "batch_sizes": list(batch_sizes)}
    if ablation_batch is not None:
        settings["ablation_batch"] = ablation_batch
    rows = [{"runtime": "rt", "precision": "fp32", **r} for r in rows]
    return {"run": "r", "rows": rows, "settings": settings, "environment": {}, "timing": {},
            "ratios": {"vs_teacher": rep.ratios(rows, "teacher-fp32", list(batch_sizes)),
                       "vs_optimum_int8": rep.ratios(rows, "optimum-onnx-int8", list(batch_sizes))},
            "verdict": {"summary": "s", "lines": []}, "best": {"name": None, "why": "w"},
            "pipeline": {"lines": [], "stage_seconds": {}}, "optimum": {},
            "ablation": [{"step": "quantize (dynamic)", "what": "onnx -> onnx-int8", "p50_before_ms": 2.0,
                          "p50_after_ms": 1.0, "speedup": 2.0}]}


def test_markdown_sizes_are_in_millions_of_bytes_as_the_bars(tools):
    _, rep, _ = tools
    rows = [_row("teacher-fp32", "teacher", size=8_000_000, p50s={1: 8.0}),
            _row("edgekd-onnx-int8", size=7_240_000, p50s={1: 1.0})]
    text = rep.markdown(_markdown_data(rep, rows))
    assert "| size MB (10^6 B) |" in text
    # 7,240,000 bytes is 7.24 MB, the unit of the <= 8 MB bar and of seeds.md (6.90 if read as MiB)
    assert "| edgekd-onnx-int8 | " in text and " | 7.24 | " in text.split("| edgekd-onnx-int8 | ")[1].splitlines()[0]


def test_a_row_that_never_ran_is_not_measured_not_outside_the_budget(tools):
    _, rep, _ = tools
    ran = {**_row("edgekd-onnx"), "val_accuracy": 0.70}
    never = {**_row("edgekd-coreml", acc=None, status="skipped"), "val_accuracy": None}
    rep.select_best([ran, never], 0.84, 0.01, 1)
    assert rep.note(ran) == "outside the accuracy budget"
    assert rep.note(never) == "not measured"


def test_executorch_rows_carry_no_false_thread_note(tools, tmp_path):
    compare_tools, _, _ = tools
    entries = [{"name": "executorch", "folder": str(tmp_path), "target": "executorch", "size_bytes": 1}]
    specs, _ = compare_tools._specs(tmp_path, {}, entries, {})
    row = next(s for s in specs if s["name"] == "edgekd-executorch")
    # the ExecuTorch runner applies compare_tools' threads (export/executorch.py set_threads), and says so
    assert not any("thread" in n for n in row.get("notes") or [])


def test_the_ablation_reads_batch_1_whatever_the_order_of_the_batch_sizes(tools):
    compare_tools, rep, _ = tools
    assert compare_tools.ablation_batch_of((8, 1)) == 1 and compare_tools.ablation_batch_of([1, 8]) == 1
    assert compare_tools.ablation_batch_of((8, 4)) == 8  # no batch 1 timed: the first, and the heading says so
    rows = [_row("teacher-fp32", "teacher", p50s={1: 8.0, 8: 30.0}), _row("edgekd-onnx-int8", p50s={1: 1.0, 8: 6.0})]
    assert "(batch 1, same texts)" in rep.markdown(_markdown_data(rep, rows, (8, 1), ablation_batch=1))
    assert "(batch 8, same texts)" in rep.markdown(_markdown_data(rep, rows, (8, 4), ablation_batch=8))
