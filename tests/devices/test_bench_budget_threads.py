"""A time budget and an in-process bench keep every row on the same inputs and threads: the rows are
cut to the same first calls (fingerprinted), and torch runs on the bench's threads in the caller's
process, which gets its own count back."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgekd.devices import measure
from edgekd.devices import remote_runner as rr

IO = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}


def _plan(tmp_path, n=40):
    ids = np.arange(n, dtype=np.int64).reshape(n, 1) + 100
    np.savez(tmp_path / "examples.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.savez(tmp_path / "plan.npz", b1=np.arange(n).reshape(n, 1))
    return {"io": {**IO, "dynamic_axes": {"input_ids": {"0": "batch", "1": "sequence"}}}}


class Sleeper:
    """A runner that takes ``delay`` seconds a call."""

    input_names, output_names = IO["input_names"], IO["output_names"]

    def __init__(self, delay):
        self.delay = delay

    def run(self, inputs):
        time.sleep(self.delay)
        return {"logits": np.zeros((1, 2), np.float32)}


def test_a_budget_records_the_fingerprint_of_every_prefix_of_the_calls_it_timed(tmp_path):
    meta = _plan(tmp_path)
    job = {"name": "r", "cases": [[1, "real"]], "warmup": 2, "runs": 30, "call_offset": 5, "in_process": True,
           "examples": "examples.npz", "plan": "plan.npz", "time_budget_s": 0.03, "min_runs": 2}
    result, _ = rr.measure(lambda: Sleeper(0.005), job, tmp_path, meta)
    case = result["cases"][0]
    k = len(case["times_ms"])
    assert 2 <= k < 30 and len(case["timed_prefix_sha256"]) == k
    calls = rr.real_length_calls(meta["io"], {"input_ids": np.arange(40).reshape(40, 1) + 100,
                                              "attention_mask": np.ones((40, 1), np.int64)},
                                 np.arange(40).reshape(40, 1))
    timed = calls[2 + 5:][:k]  # after the two warm-up calls, this round's slice starts 5 calls later
    assert case["timed_prefix_sha256"][-1] == rr.inputs_sha256(timed)
    assert case["timed_prefix_sha256"][0] == rr.inputs_sha256(timed[:1])
    # Without a budget nothing extra is recorded.
    result, _ = rr.measure(lambda: Sleeper(0.0), {**job, "time_budget_s": None, "runs": 3}, tmp_path, meta)
    assert "timed_prefix_sha256" not in result["cases"][0]


def _round(times_ms, prints, batch=1):
    return {"status": "ok", "cases": [{"batch": batch, "seq": "real", "inputs_sha256": "whole-plan",
                                       "times_ms": list(times_ms), "timed_prefix_sha256": list(prints),
                                       **rr.summarize([t / 1000 for t in times_ms], batch)}]}


def test_budgeted_rows_keep_the_same_first_calls_in_every_round_and_share_one_fingerprint():
    # Round 0: "fast" timed 5 calls, "slow" 3; round 1: "fast" 2, "slow" 4. Each keeps the fewest.
    prints0, prints1 = [f"r0c{i}" for i in range(5)], [f"r1c{i}" for i in range(4)]
    results = {
        "fast": [_round([1.0, 1.0, 9.0, 9.0, 9.0], prints0), _round([1.0, 1.0], prints1[:2])],
        "slow": [_round([2.0, 2.0, 2.0], prints0[:3]), _round([2.0, 2.0, 50.0, 50.0], prints1)],
    }
    measure.equalize_timed_calls(results)
    assert [len(r["cases"][0]["times_ms"]) for r in results["fast"]] == [3, 2]
    assert [len(r["cases"][0]["times_ms"]) for r in results["slow"]] == [3, 2]
    assert results["fast"][0]["cases"][0]["inputs_sha256"] == results["slow"][0]["cases"][0]["inputs_sha256"] == "r0c2"
    assert results["slow"][1]["cases"][0]["p50_ms"] == pytest.approx(2.0)  # the 50 ms calls were cut
    fast, slow = (measure.merge_rounds(results[n])["cases"][0] for n in ("fast", "slow"))
    assert fast["inputs_sha256"] == slow["inputs_sha256"] != "whole-plan"
    assert fast["runs"] == slow["runs"] == fast["budget_kept_calls"] == 5
    assert slow["p50_ms"] == pytest.approx(2.0) and "timed_prefix_sha256" not in slow
    # One round only: the same cut, the figures summarised again on it.
    one = {"a": [_round([1.0, 1.0, 30.0], ["x", "y", "z"])], "b": [_round([3.0, 3.0], ["x", "y"])]}
    measure.equalize_timed_calls(one)
    a = measure.merge_rounds(one["a"])["cases"][0]
    assert a["runs"] == 2 and a["p50_ms"] == pytest.approx(1.0) and a["inputs_sha256"] == "y"
    assert "times_ms" not in a and "timed_prefix_sha256" not in a


def test_without_a_budget_the_rounds_are_left_as_they_were():
    r = _round([1.0, 2.0], ["p", "q"])
    del r["cases"][0]["timed_prefix_sha256"]
    results = {"a": [r]}
    measure.equalize_timed_calls(results)
    assert results["a"][0]["cases"][0]["inputs_sha256"] == "whole-plan"
    assert results["a"][0]["cases"][0]["times_ms"] == [1.0, 2.0]


def test_an_in_process_torch_row_runs_on_the_bench_threads_and_the_caller_gets_its_own_back(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    seen = {}

    def fake_run_job(job_path, result_path, load_factory=None):
        job = json.loads(job_path.read_text())
        seen["threads"] = job["threads"]
        torch.set_num_threads(job["threads"])  # as the worker's loader does for a torch row
        seen["during"] = torch.get_num_threads()
        result_path.write_text(json.dumps({"name": job["name"], "status": "ok", "cases": []}))
        return 0

    monkeypatch.setattr(rr, "run_job", fake_run_job)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    result, _ = measure.run_job({"name": "pytorch-student", "kind": "torch", "threads": want}, tmp_path,
                                isolate=False, timeout_s=10)
    assert result["status"] == "ok"
    assert seen == {"threads": want, "during": want}
    assert torch.get_num_threads() == before


MANIFEST = {"teacher": 0.9, "student": 0.8, "source": "manifest:stages.eval.metrics"}


def test_deltas_on_a_subset_read_the_benchs_own_pytorch_rows_scored_on_that_subset():
    rows = [{"name": "onnx-int8", "accuracy": 0.4, "scored_examples": 10},
            {"name": "pytorch-student", "accuracy": 0.5, "scored_examples": 10},
            {"name": "pytorch-teacher", "accuracy": 0.6, "scored_examples": 10}]
    ref = measure.same_examples_reference(MANIFEST, rows, total=200)
    assert (ref["teacher"], ref["student"]) == (0.6, 0.5) and "same 10 of the 200" in ref["source"]
    assert measure.deltas(0.5, ref)["delta_vs_student"] == pytest.approx(0.0)  # the student against itself


def test_deltas_on_a_subset_without_pytorch_rows_are_not_computed_and_say_why():
    rows = [{"name": "onnx-int8", "accuracy": 0.4, "scored_examples": 10}]
    ref = measure.same_examples_reference(MANIFEST, rows, total=200)
    assert ref["teacher"] is None and ref["student"] is None and "bench.eval_examples" in ref["source"]
    assert measure.deltas(0.4, ref) == {"delta_vs_teacher": None, "delta_vs_student": None}
    # Rows scored on different counts: nothing is compared either.
    mixed = rows + [{"name": "pytorch-student", "accuracy": 0.5, "scored_examples": 200}]
    assert measure.same_examples_reference(MANIFEST, mixed, total=200)["student"] is None


def test_the_whole_test_split_keeps_the_eval_stages_reference():
    rows = [{"name": "onnx-int8", "accuracy": 0.4, "scored_examples": 200}]
    assert measure.same_examples_reference(MANIFEST, rows, total=200) is MANIFEST
    caller = {"teacher": 0.9, "student": 0.8, "source": "caller"}
    assert measure.same_examples_reference(caller, [{**rows[0], "scored_examples": 10}], total=200) is caller


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_a_bench_with_a_time_budget_times_every_row_on_the_same_calls(tiny_run, tmp_path):
    import shutil

    from edgekd.devices.bench import bench_run
    from edgekd.devices.tables import load_results
    from edgekd.recipe import BenchConfig
    from edgekd.tasks.text.task import classification_metrics

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export", run / "export")
    # The eval stage's figures cover the whole test split; the bench scores 10 examples.
    (run / "manifest.json").write_text(json.dumps(
        {"stages": {"eval": {"metrics": {"teacher.accuracy": 0.99, "student.accuracy": 0.98}}}}))
    cfg = BenchConfig(warmup=1, runs=400, batch_sizes=[1], time_budget_s=0.2, min_runs=2, rounds=2,
                      targets=["onnx", "onnx-int8"], eval_examples=10)
    bench_run(run, "local", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics,
              torch_models={"student": (tiny_run.module, tiny_run.io)})
    data = load_results(run)
    cases = {e["name"]: e["cases"][0] for e in data["results"]}
    assert set(cases) == {"onnx", "onnx-int8", "pytorch-student"}
    assert len({c["inputs_sha256"] for c in cases.values()}) == 1
    assert len({c["runs"] for c in cases.values()}) == 1 and next(iter(cases.values()))["runs"] < 400
    assert all(c["budget_kept_calls"] == c["runs"] for c in cases.values())
    # Scored on 10 test examples: the Δ columns read the bench's own student row on those 10.
    assert "same 10 of the" in data["reference"]["source"]
    student = next(e for e in data["results"] if e["name"] == "pytorch-student")
    assert student["delta_vs_student"] == pytest.approx(0.0)
