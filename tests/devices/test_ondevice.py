"""Phones: ON_DEVICE.md with the exact commands, and the tools' result files read back into the table.

The tool outputs below follow the formats in ExecuTorch's sources: executor_runner's log lines
(examples/portable/executor_runner/executor_runner.cpp) and the Android benchmark app's
benchmark_results.json (extension/benchmark/android/benchmark, BenchmarkMetric).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgekd.devices.bench import bench_run
from edgekd.devices.ondevice import (
    import_result,
    parse_executor_runner_log,
    parse_executorch_app,
    parse_xcode_template,
)
from edgekd.errors import StageError
from edgekd.recipe import BenchConfig, ExportConfig
from edgekd.tasks.text.task import classification_metrics

RUNNER_LOG = """I 00:00:00.001 executor_runner.cpp:150] Model file model.pte is loaded.
I 00:00:00.012 executor_runner.cpp:300] Model loaded in 11.500000 ms.
I 00:00:00.020 executor_runner.cpp:420] Iteration 1 of 6: 9.000000 ms
I 00:00:00.025 executor_runner.cpp:420] Iteration 2 of 6: 4.000000 ms
I 00:00:00.029 executor_runner.cpp:420] Iteration 3 of 6: 2.000000 ms
I 00:00:00.031 executor_runner.cpp:420] Iteration 4 of 6: 2.500000 ms
I 00:00:00.034 executor_runner.cpp:420] Iteration 5 of 6: 3.000000 ms
I 00:00:00.036 executor_runner.cpp:420] Iteration 6 of 6: 2.000000 ms
I 00:00:00.036 executor_runner.cpp:430] Model executed successfully 6 time(s) in 22.500000 ms.
"""


def test_parse_executor_runner_log():
    res = parse_executor_runner_log(RUNNER_LOG, warmup=2)
    assert res["load_s"] == pytest.approx(0.0115)
    assert res["first_inference_s"] == pytest.approx(0.009)
    (case,) = res["cases"]
    assert case["runs"] == 4 and case["warmup_dropped"] == 2  # 2.0, 2.5, 3.0, 2.0 ms remain
    assert case["p50_ms"] == pytest.approx(2.25) and case["mean_ms"] == pytest.approx(2.375)
    old = parse_executor_runner_log("Model executed successfully 10 time(s) in 50.0 ms.", warmup=2)
    assert old["cases"][0]["mean_ms"] == 5.0 and "mean only" in old["cases"][0]["note"]
    with pytest.raises(StageError, match="not an executor_runner log"):
        parse_executor_runner_log("E executor_runner.cpp:200] Loading of method forward failed", 0)


def test_a_log_with_too_few_iterations_is_refused_saying_how_many_to_run():
    """Warm-up runs are never timed: a log with no more iterations than warm-up (or fewer than the bench's
    warm-up and runs) is refused with the --num_executions ON_DEVICE.md asks for, not summarised anyway."""
    with pytest.raises(StageError, match=r"has 6 iteration\(s\), and this bench takes 6 warm-up \(bench.warmup\) "
                                         r"and at least one timed.*--num_executions 7 \(the command in ON_DEVICE.md\)"):
        parse_executor_runner_log(RUNNER_LOG, warmup=6)
    # One run left after warm-up is that run alone, never the warm-up runs with it.
    (case,) = parse_executor_runner_log(RUNNER_LOG, warmup=5)["cases"]
    assert case["runs"] == 1 and case["p50_ms"] == pytest.approx(2.0) and case["warmup_dropped"] == 5
    with pytest.raises(StageError, match=r"2 warm-up \(bench.warmup\) and 10 timed \(bench.runs\).*--num_executions 12"):
        parse_executor_runner_log(RUNNER_LOG, warmup=2, runs=10)
    (case,) = parse_executor_runner_log(RUNNER_LOG, warmup=2, runs=4)["cases"]
    assert case["runs"] == 4 and case["warmup_dropped"] == 2


APP_JSON = [
    {"benchmarkModel": {"name": "model", "backend": "", "quantization": ""}, "metric": "avg_inference_latency(ms)",
     "actualValue": 4.0, "targetValue": 0.0, "deviceInfo": {"device": "samsung", "arch": "SM-S911B", "os": "Android 14"}},
    {"benchmarkModel": {"name": "model", "backend": "", "quantization": ""},
     "metric": "trimmean_inference_latency(ms)", "actualValue": 3.8, "targetValue": 0.0},
    {"benchmarkModel": {"name": "model", "backend": "", "quantization": ""}, "metric": "model_load_time(ms)",
     "actualValue": 25.0, "targetValue": 0.0},
    {"benchmarkModel": {"name": "model", "backend": "", "quantization": ""}, "metric": "load_status",
     "actualValue": 0.0, "targetValue": 0.0},
    {"benchmarkModel": {"name": "model", "backend": "", "quantization": ""}, "metric": "ram_pss_usage(mb)",
     "actualValue": 12.5, "targetValue": 0.0},
]


def test_parse_executorch_app():
    res = parse_executorch_app(APP_JSON)["model"]
    assert res["status"] == "ok" and res["load_s"] == pytest.approx(0.025)
    case = res["cases"][0]
    assert case["mean_ms"] == 4.0 and case["trimmed_mean_ms"] == 3.8 and case["throughput"] == 250.0
    assert res["memory"] == {"pss_delta_mb": 12.5}
    assert res["environment"]["device"]["arch"] == "SM-S911B"
    failed = parse_executorch_app([{**APP_JSON[3], "actualValue": 34.0}])["model"]
    assert failed["status"] == "error" and "34" in failed["error"]


def test_parse_xcode_template():
    res = parse_xcode_template({"format": "edgekd-coreml-xcode/1", "name": "coreml", "device": "iPhone 15 Pro",
                                "load_median_ms": 40.0, "prediction_median_ms": 1.6, "compute_units": "All"})
    assert res["cases"][0]["p50_ms"] == 1.6 and res["load_s"] == 0.04
    with pytest.raises(StageError, match="prediction_median_ms"):
        parse_xcode_template({"format": "edgekd-coreml-xcode/1", "name": "coreml"})


@pytest.fixture(scope="module")
def phone_run(tiny_run, tmp_path_factory):
    """The tiny run plus ExecuTorch (and, where it converts, Core ML) folders from the export stage."""
    from edgekd.export.stage import export_all
    from edgekd.tasks.text.task import TEXT_IO

    run = tmp_path_factory.mktemp("phone") / "phone-run"
    shutil.copytree(tiny_run.run_dir, run)
    records = export_all(tiny_run.module, TEXT_IO, ["executorch", "coreml"], run / "export", ExportConfig(),
                         tiny_run.eval_inputs, tiny_run.labels, classification_metrics,
                         {"labels": ["negative", "positive"], "max_length": 16}, [])
    if records["executorch"]["status"] != "ok":
        pytest.skip(f"ExecuTorch export did not run here: {records['executorch']['reason']}")
    return run, records


@pytest.mark.slow
def test_android_on_device_commands_and_import(phone_run, tiny_run, tmp_path):
    run, _ = phone_run
    cfg = BenchConfig(warmup=2, runs=4, batch_sizes=[1])
    bench_run(run, "android-executorch", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics)
    out = run / "bench" / "android-executorch"
    data = json.loads((out / "results.json").read_text())
    res = {e["name"]: e for e in data["results"]}
    assert res["executorch"]["status"] == "pending"
    assert res["onnx"]["status"] == "skipped" and "does not run target 'onnx'" in res["onnx"]["reason"]
    guide = (out / "ON_DEVICE.md").read_text()
    assert f"adb push {run / 'export' / 'executorch' / 'model.pte'} /data/local/tmp/edgekd/executorch/" in guide
    assert ("executor_runner --model_path model.pte --inputs input_ids.bin,attention_mask.bin "
            "--input_shapes 1x16,1x16") in guide
    assert "--num_executions 6 --cpu_threads 4" in guide
    assert "org.pytorch.minibench/org.pytorch.minibench.BenchmarkActivity" in guide
    # The input files hold real examples at the program's upper bound (batch 32 x sequence 16).
    ids = np.frombuffer((out / "inputs" / "executorch" / "input_ids.bin").read_bytes(), dtype="<i8")
    assert ids.size == 32 * 16
    np.testing.assert_array_equal(ids.reshape(32, 16)[0], tiny_run.eval_inputs["input_ids"][0])

    assert "refuses a log with fewer than 6 iterations" in guide
    log = tmp_path / "executor_runner-executorch.log"
    log.write_text("".join(RUNNER_LOG.splitlines(keepends=True)[:6]))  # 4 of the 6 executions asked for
    with pytest.raises(StageError, match="--num_executions 6"):
        import_result(run, "android-executorch", log, name="executorch")
    log.write_text(RUNNER_LOG)
    assert import_result(run, "android-executorch", log, name="executorch")["imported"] == ["executorch"]
    data = json.loads((out / "results.json").read_text())
    e = next(e for e in data["results"] if e["name"] == "executorch")
    assert e["status"] == "ok" and e["imported_from"] == log.name
    assert e["cases"][0]["seq"] == 16 and e["cases"][0]["p50_ms"] == pytest.approx(2.25)
    assert "| executorch | executorch |" in (out / "table.md").read_text()
    assert (out / "ON_DEVICE.md").is_file()  # kept across the import
    with pytest.raises(StageError, match="pass --name"):
        import_result(run, "android-executorch", log)

    app = tmp_path / "benchmark_results.json"
    app.write_text(json.dumps(APP_JSON))
    import_result(run, "android-executorch", app, name="executorch")
    e = next(e for e in load(out)["results"] if e["name"] == "executorch")
    assert e["cases"][0]["mean_ms"] == 4.0 and "mean" in (out / "table.md").read_text()


def load(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_executorch_artifact_runs_in_the_local_bench(phone_run, tiny_run):
    run, _ = phone_run
    cfg = BenchConfig(warmup=1, runs=3, batch_sizes=[1, 2], targets=["executorch"])
    summary = bench_run(run, "local", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics)
    e = summary["models"]["executorch"]
    assert e["status"] == "ok" and e["p50_ms"] > 0
    import torch

    with torch.inference_mode():
        logits = tiny_run.module(**{k: torch.from_numpy(v) for k, v in tiny_run.eval_inputs.items()})[0].numpy()
    assert e["accuracy"] == pytest.approx(classification_metrics({"logits": logits}, tiny_run.labels)["accuracy"])


@pytest.mark.slow
def test_iphone_guide_and_xcode_import(phone_run, tmp_path):
    run, records = phone_run
    bench_run(run, "iphone-coreml", BenchConfig())
    out = run / "bench" / "iphone-coreml"
    guide = (out / "ON_DEVICE.md").read_text()
    if records["coreml"]["status"] != "ok":
        assert "No export folder of this run has a 'coreml' artifact" in guide
        pytest.skip(f"Core ML conversion did not succeed here: {records['coreml']['reason']}")
    assert "Performance" in guide and "coreml-coreml.result.json" in guide
    template = json.loads((out / "coreml-coreml.result.json").read_text())
    template.update(device="iPhone 15 Pro", os="iOS 18.1", load_median_ms=35.0, prediction_median_ms=1.2)
    filled = tmp_path / "filled.json"
    filled.write_text(json.dumps(template))
    import_result(run, "iphone-coreml", filled)
    e = next(e for e in load(out)["results"] if e["name"] == "coreml")
    assert e["status"] == "ok" and e["cases"][0]["p50_ms"] == 1.2 and e["runtime"]["compute_units"] == "All"


def test_an_on_device_bench_records_that_rounds_do_not_apply():
    """The device's own tool times each model once: the record and the table say bench.rounds did not
    apply there (a saved recipe carries every key, so refusing it would refuse every run folder)."""
    from edgekd.devices import tables
    from edgekd.devices.measure import Inputs

    inputs = Inputs(None, None, None, None, None)
    rec = tables.inputs_record(BenchConfig(rounds=3), inputs, 1, rounds=1)
    assert rec["rounds"] == 1 and "bench.rounds 3 does not apply here" in rec["rounds_note"]
    assert "does not apply here" in tables._rounds_text(rec)
    assert "rounds_note" not in tables.inputs_record(BenchConfig(rounds=3), inputs, 1, rounds=3)
    assert tables._rounds_text(tables.inputs_record(BenchConfig(rounds=1), inputs, 1, rounds=1)) == ""


@pytest.mark.parametrize("profile, tool, reads, ignored", [
    ("android-executorch", "executor_runner over adb", {"threads": 4, "warmup": 3, "runs": 9, "batch_sizes": [1]},
     {"rounds": 7, "time_budget_s": 3.0, "timeout_s": 9.0, "eval_examples": 5, "eval_batch_size": 3,
      "seq_lengths": [32], "synthetic_vocab_size": 50}),
    ("iphone-coreml", "Xcode's Core ML performance report", {},
     {"threads": 2, "warmup": 99, "runs": 999, "rounds": 7, "batch_sizes": [1], "timeout_s": 9.0,
      "inputs": "synthetic", "eval_examples": 5}),
])
def test_a_phone_profile_refuses_each_bench_key_its_tool_does_not_read(profile, tool, reads, ignored):
    """A phone is timed by its own tool (ON_DEVICE.md), which reads some bench keys (adb: threads, warm-up,
    runs, inputs, batch 1) and Xcode none: every other key set away from its default is refused, each
    named with the tool, never accepted and ignored; the keys the tool reads pass."""
    from edgekd.devices.bench import config_problems
    from edgekd.devices.profiles import load_profile

    prof = load_profile(profile, detect=False)
    assert config_problems(BenchConfig(**reads), prof) == []
    problems = config_problems(BenchConfig(**reads, **ignored), prof)
    assert len(problems) == len(ignored), problems
    for key in ignored:
        line = next(p for p in problems if p.startswith(f"bench.{key}:"))
        assert tool in line and f"drop bench.{key}" in line
    if profile == "android-executorch":  # batch 1 only
        assert config_problems(BenchConfig(batch_sizes=[1, 8]), prof) == []  # the default: not a key the recipe set
        (line,) = config_problems(BenchConfig(batch_sizes=[4, 16]), prof)
        assert line.startswith("bench.batch_sizes:") and "batch 1 only" in line
