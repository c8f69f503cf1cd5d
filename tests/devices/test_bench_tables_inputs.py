"""The bench tables say what every row was timed on and never put rows timed on different inputs or
threads side by side: a comparison of one device at two thread counts is refused, rows imported from a
phone's own benchmark tool (no inputs fingerprint) are listed but not compared, and a time budget is
said as such. Every input is a hand-built results.json: fast and offline."""

from __future__ import annotations

import json

import pytest

from edgekd.devices import tables
from edgekd.errors import StageError

FP = "ab" * 32  # the inputs fingerprint every bench-timed row shares
PLAN = ("real lengths: each test text at its own length at batch 1; larger batches padded to their "
        "longest text")
LOG = "executor_runner-executorch.log"


def _entry(name, p50, fp=FP, accuracy=0.8, imported_from=None, runs=50, target="onnx"):
    e = {"name": name, "kind": "artifact", "target": target, "precision": "fp32", "status": "ok",
         "accuracy": accuracy, "size_bytes": 2**20,
         "cases": [{"batch": 1, "seq": "real" if fp else 16, "runs": runs, "p50_ms": p50, "p99_ms": p50 * 1.2,
                    "mean_ms": p50, "throughput": 1000 / p50, **({"inputs_sha256": fp} if fp else {})}]}
    if imported_from:
        e["imported_from"] = imported_from
    return e


def _data(entries, profile="local", threads=2, cpu="Test CPU 9000", budget=None, env_threads=None, run="run"):
    inputs = {"mode": "real", "description": PLAN, "source": "real", "timed_calls": 50, "warmup_calls": 10,
              "rounds": 1}
    if threads is not None:
        inputs["threads"] = threads
    return {"run": run, "profile": {"name": profile, "processor": "auto"},
            "config": {"runs": 50, "warmup": 10, "time_budget_s": budget},
            "headline": {"batch": 1, "seq": "real"}, "inputs": inputs, "metric": "accuracy",
            "reference": {"teacher": 0.85, "student": 0.84, "source": "caller"},
            "environment": {"cpu": {"model": cpu}, "threads": {"requested": env_threads}},
            "results": entries}


def _write(tmp_path, run, data):
    """results.json where a bench of ``run`` on the data's profile writes it; returns its bench folder."""
    out = tmp_path / run / "bench" / data["profile"]["name"]
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(data))
    return out


# --- 1. report --compare: threads --------------------------------------------------------------------


def test_one_device_at_two_thread_counts_is_refused(tmp_path):
    a = _write(tmp_path, "a", _data([_entry("onnx", 1.0)], threads=2))
    b = _write(tmp_path, "b", _data([_entry("onnx", 2.0)], threads=4))
    with pytest.raises(StageError, match="different thread counts") as err:
        tables.report(a, compare=[b])
    msg = str(err.value)
    assert "a/local at 2 threads" in msg and "b/local at 4 threads" in msg
    assert "--profile local --set bench.threads=N" in msg


def test_the_thread_count_falls_back_to_the_environments_request(tmp_path):
    a = _write(tmp_path, "a", _data([_entry("onnx", 1.0)], threads=None, env_threads=1))
    b = _write(tmp_path, "b", _data([_entry("onnx", 2.0)], threads=2))
    with pytest.raises(StageError, match=r"a/local at 1 thread\b.*b/local at 2 threads"):
        tables.report(a, compare=[b])


def test_one_device_at_one_thread_count_gets_ratios_and_a_header_of_each_side(tmp_path):
    a = _write(tmp_path, "a", _data([_entry("onnx", 1.0)], threads=2))
    b = _write(tmp_path, "b", _data([_entry("onnx", 2.0)], threads=None, env_threads=2))
    text = tables.report(a, compare=[b])
    for side in ("a/local", "b/local"):
        assert (f"- {side}: profile local; CPU Test CPU 9000; 2 threads; inputs sha256 {FP[:16]}… ({PLAN})."
                in text), text
    assert "compare devices" not in text
    assert "| onnx | 1.000 | 0.8000 | 2.000 | 0.8000 | 2.00× |" in text


def test_two_devices_may_differ_in_threads_and_the_header_says_so(tmp_path):
    a = _write(tmp_path, "a", _data([_entry("onnx", 1.0)], profile="laptop", threads=8, cpu="Laptop CPU"))
    b = _write(tmp_path, "b", _data([_entry("onnx", 4.0)], profile="pi5", threads=4, cpu="Cortex-A76"))
    text = tables.report(a, compare=[b])
    assert "- a/laptop: profile laptop; CPU Laptop CPU; 8 threads;" in text
    assert "- b/pi5: profile pi5; CPU Cortex-A76; 4 threads;" in text
    assert ("The p50 ratios compare devices, each timed at its own profile's threads (laptop at 8 threads, "
            "pi5 at 4 threads).") in text
    assert "| 4.00× |" in text


# --- 2. rows without an inputs fingerprint -------------------------------------------------------------


def test_the_table_does_not_claim_the_same_inputs_for_imported_rows():
    data = _data([_entry("onnx", 1.0), _entry("executorch", 2.5, fp=None, imported_from=LOG, target="executorch")])
    text = tables.markdown(data)
    assert "Inputs (the same for every row)" not in text
    assert f"Inputs (the same for every row with an inputs sha256): {PLAN}" in text
    not_compared = next(ln for ln in text.splitlines() if ln.startswith("Not compared:"))
    assert f"executorch (imported from {LOG})" in not_compared
    assert "inputs it does not record, at the shapes in the case table" in not_compared
    assert "listed, not compared" in not_compared and "onnx" not in not_compared


def test_a_table_of_imported_rows_only_says_its_inputs_were_not_recorded():
    data = _data([_entry("executorch", 2.5, fp=None, imported_from=LOG, target="executorch")])
    text = tables.markdown(data)
    assert PLAN not in text and "the same for every row" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("Inputs"))
    assert line.startswith("Inputs: not recorded.") and f"executorch (imported from {LOG})" in line
    assert "at the shapes in the case table" in line


def test_a_table_of_bench_rows_only_still_says_they_share_the_inputs():
    text = tables.markdown(_data([_entry("onnx", 1.0), _entry("onnx-int8", 0.5)]))
    assert f"Inputs (the same for every row): {PLAN}; real test examples, 50 timed calls after 10 warm-up" in text
    assert "Not compared" not in text


def test_no_ratio_against_a_row_without_an_inputs_fingerprint(tmp_path):
    a = _write(tmp_path, "a", _data([_entry("onnx", 1.0), _entry("executorch", 2.0)], profile="laptop"))
    b = _write(tmp_path, "b", _data([_entry("onnx", 3.0), _entry("executorch", 4.0, fp=None, imported_from=LOG)],
                                    profile="android"))
    text = tables.report(a, compare=[b])
    lines = text.splitlines()
    assert next(ln for ln in lines if ln.startswith("| executorch |")).endswith("| 4.000 | 0.8000 | — |")
    assert next(ln for ln in lines if ln.startswith("| onnx |")).endswith("| 3.00× |")
    why = next(ln for ln in lines if ln.startswith("No p50 ratio"))
    assert f"executorch (imported from {LOG}) on b/android" in why and "not compared" in why


def test_the_pareto_plot_leaves_out_rows_without_an_inputs_fingerprint(tmp_path):
    data = _data([_entry("onnx", 1.0), _entry("onnx-int8", 0.5, accuracy=0.78),
                  _entry("executorch", 2.5, fp=None, imported_from=LOG, target="executorch")])
    fig, labels = tables.pareto_figure(data)
    assert fig is not None and sorted(t.get_text() for t in labels) == ["onnx", "onnx-int8"]
    assert f"left out executorch (imported from {LOG})" in data["pareto_note"]
    # Written with the bench: results.json and the table carry the note; the png is still drawn.
    tables.write_bench_dir(tmp_path / "bench", data)
    assert "left out executorch" in json.loads((tmp_path / "bench" / "results.json").read_text())["pareto_note"]
    assert "Pareto plot: left out executorch" in (tmp_path / "bench" / "table.md").read_text()
    assert (tmp_path / "bench" / "pareto.png").is_file()


def test_a_pareto_plot_of_imported_rows_only_plots_them_all():
    data = _data([_entry("executorch", 2.5, fp=None, imported_from=LOG),
                  _entry("coreml", 1.5, fp=None, imported_from="filled.json")])
    data["pareto_note"] = "stale note from an earlier write"
    fig, labels = tables.pareto_figure(data)
    assert sorted(t.get_text() for t in labels) == ["coreml", "executorch"]
    assert "pareto_note" not in data


# --- 3. a time budget ----------------------------------------------------------------------------------


def test_a_time_budget_is_said_in_the_header():
    text = tables.markdown(_data([_entry("onnx", 1.0, runs=17), _entry("onnx-int8", 0.5, runs=17)], budget=2.5))
    assert "50 timed calls after" not in text
    assert ("each case timed up to 50 calls within a time budget of 2.5 s after 10 warm-up calls, every row "
            "keeping the same first calls (as many as the fewest any row timed; the case table's runs column "
            "shows how many)") in text
    assert "| onnx | 1 | real | 17 |" in text  # the runs column the header points to


def test_the_html_reports_chart_leaves_out_rows_without_an_inputs_fingerprint_too(tmp_path):
    """edgekd report --html draws its own chart: the same rows as pareto.png, and it says which it left out."""
    from edgekd.report_html import bench_section
    from edgekd.runfolder import RunFolder

    data = _data([_entry("onnx", 1.0), _entry("onnx-int8", 0.5, accuracy=0.78),
                  _entry("executorch", 2.5, fp=None, imported_from=LOG, target="executorch")])
    html = bench_section(RunFolder(tmp_path), [{**data, "_folder": "local"}], "accuracy")
    assert 'data-name="onnx"' in html and 'data-name="onnx-int8"' in html
    assert 'data-name="executorch"' not in html  # in the table, not on the chart
    assert f"Chart: left out executorch (imported from {LOG})" in html and ">executorch<" in html
