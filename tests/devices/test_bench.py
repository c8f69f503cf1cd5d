"""The bench stage on a tiny ONNX run: files written, figures consistent, reports side by side."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from edgekd.devices import measure
from edgekd.devices import remote_runner as rr
from edgekd.devices.bench import bench_run, discover
from edgekd.devices.measure import reference_accuracies
from edgekd.devices.tables import load_results, pareto_front, report
from edgekd.errors import DataError, StageError
from edgekd.recipe import BenchConfig
from edgekd.tasks.text.task import classification_metrics

FAST = dict(warmup=1, runs=5, batch_sizes=[1, 4])
OOD_ROWS = 20


def _ood(tiny_run):
    """A stand-in out-of-domain set: the last test rows cut to 10 tokens, labels flipped (so its
    accuracy differs from the test accuracy and a mix-up of the two would show)."""
    inputs = {k: np.ascontiguousarray(v[-OOD_ROWS:, :10]) for k, v in tiny_run.eval_inputs.items()}
    return "fake-ood", inputs, 1 - tiny_run.labels[-OOD_ROWS:]


@pytest.fixture(scope="module")
def local_bench(tiny_run):
    """One isolated bench on the local profile, eager student included (each model in a child process)."""
    cfg = BenchConfig(**FAST)
    summary = bench_run(tiny_run.run_dir, "local", cfg, tiny_run.eval_inputs, tiny_run.labels,
                        classification_metrics, torch_models={"student": (tiny_run.module, tiny_run.io)},
                        ood=_ood(tiny_run))
    return summary, json.loads((tiny_run.run_dir / "bench" / "local" / "results.json").read_text())


def test_pareto_front():
    # (latency, accuracy): b is beaten by a (faster and as accurate); d is slowest but most accurate.
    pts = [(1.0, 0.80), (2.0, 0.80), (1.5, 0.85), (3.0, 0.90), (0.5, 0.60)]
    assert sorted(pareto_front(pts)) == [0, 2, 3, 4]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5), (1.0, 0.7)]) == [1]  # same latency: the more accurate one


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_discover_records_why(tiny_run):
    entries = {e["name"]: e for e in discover(tiny_run.run_dir)}
    assert set(entries) == {"onnx", "onnx-int8", "tensorrt"}
    assert entries["tensorrt"]["status"] == "skipped" and "not built" in entries["tensorrt"]["reason"]
    assert entries["onnx-int8"]["precision"] == "int8" and entries["onnx"]["size_bytes"] > 0
    with pytest.raises(StageError, match="onnx-fp16"):
        discover(tiny_run.run_dir, ["onnx-fp16"])


@pytest.mark.slow
def test_local_bench_writes_every_file(local_bench, tiny_run):
    summary, data = local_bench
    out = tiny_run.run_dir / "bench" / "local"
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "table.md", "pareto.png"}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    res = {e["name"]: e for e in data["results"]}
    assert set(res) == {"onnx", "onnx-int8", "tensorrt", "pytorch-student"}
    assert res["tensorrt"]["status"] == "skipped"
    for name in ("onnx", "onnx-int8", "pytorch-student"):
        e = res[name]
        assert e["status"] == "ok", e.get("error")
        # Real lengths by default: each text at its own length, not padded to the artifact's max_length.
        assert [(c["batch"], c["seq"], c["runs"]) for c in e["cases"]] == [(1, "real", 5), (4, "real", 5)]
        # In rounds (bench.rounds, 3 by default), each in its own process: the 5 timed calls pooled.
        assert all(c["rounds"] == 3 and "times_ms" not in c for c in e["cases"])
        assert e["cases"][0]["mean_width"] < 16
        for c in e["cases"]:
            assert 0 < c["min_ms"] <= c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"] <= c["max_ms"]
            assert c["throughput"] == pytest.approx(c["batch"] * 1000 / c["mean_ms"])
        assert e["load_s"] > 0 and e["first_inference_s"] > 0 and e["size_bytes"] > 0
        assert e["memory"]["peak_delta_mb"] is not None
        # Threads pinned in the child and recorded with the figures.
        threads = e["environment"]["threads"]
        assert threads["requested"] == data["profile"]["cores"]
        assert threads["env"]["OMP_NUM_THREADS"] == str(threads["requested"])
    # A fresh process per model and round, started ahead of its turn: none of them was still importing its
    # runtime while another was let go and timed.
    spans = {(n, r): p for n in ("onnx", "onnx-int8", "pytorch-student")
             for r, p in enumerate(res[n]["processes"])}
    assert {len(res[n]["processes"]) for n in ("onnx", "onnx-int8", "pytorch-student")} == {3}
    assert len({p["pid"] for p in spans.values()}) == len(spans)
    assert all(p["started_at"] <= p["ready_at"] <= p["go_at"] <= p["ended_at"] for p in spans.values())
    assert measure.imports_overlapping_timing(list(spans.values())) == []
    assert res["onnx"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    # The ONNX rows and the PyTorch row were fed exactly the same arrays, case by case.
    for i in range(2):
        assert len({res[n]["cases"][i]["inputs_sha256"] for n in ("onnx", "onnx-int8", "pytorch-student")}) == 1
    assert res["onnx"]["cases"][0]["inputs_sha256"] != res["onnx"]["cases"][1]["inputs_sha256"]
    assert res["pytorch-student"]["runtime"]["runtime"] == "pytorch"

    # Accuracy is the task metric of the model's outputs on the evaluation inputs.
    import torch

    with torch.inference_mode():
        logits = tiny_run.module(**{k: torch.from_numpy(v) for k, v in tiny_run.eval_inputs.items()})[0].numpy()
    expected = classification_metrics({"logits": logits}, tiny_run.labels)["accuracy"]
    assert res["onnx"]["accuracy"] == pytest.approx(expected)
    assert res["pytorch-student"]["accuracy"] == pytest.approx(expected)
    # Out-of-domain accuracy from the same outputs, the OOD rows scored against their own labels.
    name, ood_inputs, ood_labels = _ood(tiny_run)
    with torch.inference_mode():
        ood_logits = tiny_run.module(**{k: torch.from_numpy(v) for k, v in ood_inputs.items()})[0].numpy()
    ood_expected = classification_metrics({"logits": ood_logits}, ood_labels)["accuracy"]
    for n in ("onnx", "pytorch-student"):
        assert res[n]["ood_accuracy"] == pytest.approx(ood_expected)
    assert data["ood"] == {"dataset": "fake-ood", "examples": OOD_ROWS}
    assert res["onnx"]["delta_vs_teacher"] == pytest.approx(expected - 0.75)  # teacher 0.75 in the manifest
    assert res["onnx"]["delta_vs_student"] == pytest.approx(expected - 0.5)
    assert data["reference"]["source"] == "manifest:stages.eval.metrics"

    env = data["environment"]
    assert env["cpu"]["model"] and env["python"] and "onnxruntime" in env["libraries"]
    assert summary["models"]["onnx"]["p50_ms"] == res["onnx"]["cases"][0]["p50_ms"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 + 2 + 2 + 1  # two cases per measured model, one row for the skipped one
    assert {r["name"] for r in rows if r["status"] == "skipped"} == {"tensorrt"}

    table = (out / "table.md").read_text()
    trt_reason = json.loads((tiny_run.run_dir / "export" / "tensorrt" / "artifact.json").read_text())["reason"]
    assert "| onnx-int8 | onnx-int8 | int8 |" in table and trt_reason in table
    assert "real lengths: each test text at its own length" in table and "OOD accuracy" in table
    assert "in 3 rounds (every model once per round, each in its own process" in table
    assert data["inputs"]["rounds"] == 3
    assert f"{ood_expected:.4f}" in table
    assert f"{(expected - 0.75) * 100:+.1f} pp" in table


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_in_process_bench_and_caller_reference(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export", run / "export")
    cfg = BenchConfig(**FAST, isolate=False, targets=["onnx"], inputs="synthetic", synthetic_vocab_size=30)
    summary = bench_run(run, "local", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics,
                        reference={"teacher": 0.9, "student": 0.8})
    data = load_results(run)
    (e,) = data["results"]
    assert e["name"] == "onnx" and e["status"] == "ok"
    assert {c["input"] for c in e["cases"]} == {"synthetic"}
    assert e["memory"]["peak_delta_mb"] is None and "caller's process" in e["memory"]["note"]
    assert data["reference"] == {"teacher": 0.9, "student": 0.8, "source": "caller"}
    assert summary["models"]["onnx"]["delta_vs_teacher"] == pytest.approx(e["accuracy"] - 0.9)


def test_a_folder_that_chose_its_onnx_runtime_session_is_benched_that_way_and_says_so(tiny_run, tmp_path, monkeypatch):
    import onnxruntime as ort

    from edgekd.export.base import read_artifact_meta, write_artifact_meta

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export", run / "export")
    meta = read_artifact_meta(run / "export" / "onnx")
    write_artifact_meta(run / "export" / "onnx", {**meta, "runtime_options": {"disabled_optimizers": ["SkipLayerNormFusion"]}})
    opened, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: opened.append(k.get("disabled_optimizers")) or real(*a, **k))
    cfg = BenchConfig(**FAST, isolate=False, targets=["onnx", "onnx-int8"])
    bench_run(run, "local", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics)
    notes = {e["name"]: e.get("note") or "" for e in load_results(run)["results"]}
    assert "ONNX Runtime session without SkipLayerNormFusion" in notes["onnx"]
    assert "SkipLayerNormFusion" not in notes["onnx-int8"]
    assert ["SkipLayerNormFusion"] in opened and None in opened  # each folder opened its own way


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_a_target_this_machine_cannot_run_is_skipped_without_a_process(tiny_run, tmp_path, monkeypatch):
    from edgekd.devices import measure
    from edgekd.export import registered

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export" / "onnx", run / "export" / "onnx")
    monkeypatch.setattr(registered()["onnx"], "runs_here", classmethod(lambda cls: "no such runtime on this OS"))

    def no_job(*a, **k):
        raise AssertionError("a measuring process was started for a target this machine cannot run")

    monkeypatch.setattr(measure, "run_job", no_job)
    bench_run(run, "local", BenchConfig(**FAST), tiny_run.eval_inputs, tiny_run.labels, classification_metrics)
    (e,) = load_results(run)["results"]
    assert e["status"] == "skipped" and e["reason"] == "not run here: no such runtime on this OS"


def test_core_ml_says_where_it_runs():
    import sys

    from edgekd.export import registered

    why = registered()["coreml"].runs_here()
    assert why is None if sys.platform == "darwin" else why == f"Core ML predicts only on macOS (this is {sys.platform})"
    assert registered()["onnx"].runs_here() is None


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_bench_without_accuracy_says_why_no_plot(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export" / "onnx", run / "export" / "onnx")
    bench_run(run, cfg=BenchConfig(**FAST, isolate=False, seq_lengths=[8]))  # profile from the config: local
    data = load_results(run)
    assert data["results"][0]["accuracy"] is None
    assert data["pareto"].startswith("not drawn: no model has both")
    assert not (run / "bench" / "local" / "pareto.png").exists()
    assert data["results"][0]["cases"][0]["seq"] == 8


def test_reference_accuracies_from_manifest(tmp_path):
    assert reference_accuracies(tmp_path) == {"teacher": None, "student": None, "source": None}
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"stages": {"eval": {"metrics": {"teacher": {"accuracy": 0.8}, "student.accuracy": 0.7}}}}))
    assert reference_accuracies(tmp_path) == {"teacher": 0.8, "student": 0.7, "source": "manifest:stages.eval.metrics"}


def test_nothing_to_bench_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="Nothing to benchmark"):
        bench_run(tmp_path, "local", BenchConfig())


@pytest.mark.slow
def test_report_compares_two_profiles_and_two_runs(local_bench, tiny_run, tmp_path):
    one_thread = tmp_path / "local-1t.yaml"
    one_thread.write_text(yaml.safe_dump({
        "name": "local-1t", "description": "This machine, one thread.", "processor": "auto", "auto_detect": True,
        "threads": 1, "targets": ["onnx"], "runtimes": ["onnxruntime"], "connection": {"kind": "local"},
    }))
    bench_run(tiny_run.run_dir, str(one_thread), BenchConfig(**FAST, isolate=False), tiny_run.eval_inputs,
              tiny_run.labels, classification_metrics)
    text = report(tiny_run.run_dir, compare=["local-1t"], profile="local")
    assert "tiny/local p50 ms" in text and "tiny/local-1t p50 ms" in text
    onnx_row = next(ln for ln in text.splitlines() if ln.startswith("| onnx |"))
    assert onnx_row.count("×") == 1
    # Another run folder (a copy here) side by side with this one.
    other = tmp_path / "other-run"
    shutil.copytree(tiny_run.run_dir, other)
    text = report(tiny_run.run_dir, compare=[other], profile="local")
    assert "other-run/local" in text and "1.00×" in text
    # Without comparison: the table itself; an ambiguous run folder asks for a profile.
    assert report(tiny_run.run_dir, profile="local").startswith("# Bench: tiny on local")
    with pytest.raises(StageError, match="No bench results for profile 'pi'"):
        report(tiny_run.run_dir, profile="pi")


def test_table_refuses_rows_timed_on_different_inputs(tmp_path):
    """The table writer never puts rows fed different arrays side by side (here: an ONNX row padded to
    max_length beside a PyTorch row at the data's real width, the old bench's mistake)."""
    from edgekd.devices import remote_runner, tables

    ids = np.array([[101, 7, 8, 102, 0, 0]], np.int64)
    mask = (ids > 0).astype(np.int64)
    io = {"input_names": ["input_ids", "attention_mask"]}
    real = remote_runner.real_length_calls(io, {"input_ids": ids, "attention_mask": mask}, np.array([[0]]))
    assert real[0]["input_ids"].shape == (1, 4)  # cut to the text's own length
    padded = remote_runner.case_inputs(io, 1, 6, {"input_ids": ids, "attention_mask": mask})
    fp_real, fp_padded = remote_runner.inputs_sha256(real), remote_runner.inputs_sha256([padded])
    assert fp_real != fp_padded

    def entry(name, fp, kind="artifact"):
        return {"name": name, "kind": kind, "target": "onnx", "precision": "fp32", "status": "ok",
                "cases": [{"batch": 1, "seq": "real", "p50_ms": 1.0, "inputs_sha256": fp}]}

    data = {"run": "r", "profile": {"name": "local"}, "headline": {"batch": 1, "seq": "real"}, "metric": "accuracy",
            "results": [entry("onnx", fp_padded), entry("pytorch-student", fp_real, "torch")]}
    with pytest.raises(StageError, match="different inputs"):
        tables.markdown(data)
    with pytest.raises(StageError, match="different inputs"):
        tables.write_bench_dir(tmp_path / "bench", data)
    assert not (tmp_path / "bench").exists()  # nothing half-written
    data["results"][0] = entry("onnx", fp_real)
    assert "| onnx | onnx | fp32 |" in tables.markdown(data)


def test_bad_eval_inputs_are_rejected(tmp_path):
    bad = {"input_ids": np.zeros((3, 16), np.int64), "attention_mask": np.zeros((2, 16), np.int64)}
    with pytest.raises(DataError, match="equally long"):
        bench_run(tmp_path, "local", BenchConfig(), bad)


def test_rounds_rotate_the_models_and_pool_their_timed_calls():
    """Every model runs once per round in a rotated order, reversed every other round; only the first
    round evaluates; each case's figures are those of every round's timed calls together; a model that
    fails in a later round gets no figure at all (it would not be timed like the others)."""
    from edgekd.devices import measure

    assert measure.round_spans(50, 3) == [(0, 17), (17, 16), (33, 17)]
    assert measure.round_spans(2, 5) == [(0, 1), (1, 1)]  # never a round without a timed call
    assert measure.round_spans(7, 1) == [(0, 7)]

    calls = []
    times = {"a": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "b": [10.0] * 6, "c": [7.0] * 6}

    def measure_one(e, r, offset, runs):
        name, evaluate = e["name"], r == 0
        calls.append((name, offset, runs, evaluate))
        if name == "c" and offset > 0:
            return {"status": "error", "error": "out of memory"}, None
        t = times[name][offset:offset + runs]
        case = {"batch": 1, "seq": "real", "inputs_sha256": "same", "times_ms": t,
                **rr.summarize([x / 1000 for x in t], 1)}
        return {"status": "ok", "cases": [case], "load_s": 0.1 + offset}, ({"logits": np.zeros(2)} if evaluate else None)

    todo = [{"name": n} for n in ("a", "b", "c")]
    measure.in_rounds(todo, 6, 3, measure_one)
    # rotated by the round, reversed every other round: a is followed by b in rounds 0 and 2, by c in round 1
    assert [c[0] for c in calls] == ["a", "b", "c", "a", "c", "b", "c", "a", "b"]
    assert [measure.round_order(list("abcd"), r) for r in range(4)] == [
        list("abcd"), list("adcb"), list("cdab"), list("cbad")]
    assert {c[1:] for c in calls if c[0] == "a"} == {(0, 2, True), (2, 2, False), (4, 2, False)}
    a, b, c = todo
    ca = a["cases"][0]
    assert ca["runs"] == 6 and ca["rounds"] == 3 and ca["p50_ms"] == pytest.approx(3.5)
    assert ca["max_ms"] == 6.0 and "times_ms" not in ca and ca["inputs_sha256"] == "same"
    assert a["load_s"] == pytest.approx(0.1) and a["_outputs"] is not None  # the first round's
    assert b["cases"][0]["p50_ms"] == pytest.approx(10.0)
    assert c["status"] == "error" and c["error"].startswith("round 2: out of memory")
    assert "p50_ms" not in c["cases"][0] and "out of memory" in c["cases"][0]["error"]
