"""The standalone runner copied to devices: statistics, inputs, memory, and one real ONNX job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from edgekd.devices import remote_runner as rr


def test_summarize_matches_numpy():
    times = [0.010, 0.012, 0.011, 0.030, 0.009]
    s = rr.summarize(times, batch=4)
    ms = np.array(times) * 1000
    assert s["runs"] == 5
    assert s["p50_ms"] == pytest.approx(11.0)
    assert s["p90_ms"] == pytest.approx(22.8)  # sorted 9,10,11,12,30: rank 3.6 -> 12 + 0.6 * 18
    assert s["p99_ms"] == pytest.approx(29.28)  # rank 3.96 -> 12 + 0.96 * 18
    assert s["mean_ms"] == pytest.approx(14.4)
    assert s["std_ms"] == pytest.approx(np.std(ms, ddof=1))
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((9.0, 30.0))
    assert s["throughput"] == pytest.approx(4 / 0.0144)
    assert rr.summarize([0.002], 1)["std_ms"] == 0.0
    with pytest.raises(ValueError):
        rr.summarize([], 1)


def test_time_calls_counts_and_budget():
    calls = []
    times = rr.time_calls(lambda: calls.append(1), warmup=3, runs=7)
    assert len(times) == 7 and len(calls) == 10
    # With a budget the loop stops once the budget is spent, not at the run cap.
    times = rr.time_calls(lambda: time.sleep(0.01), warmup=0, runs=10_000, time_budget_s=0.05, min_runs=2)
    assert 2 <= len(times) < 20
    # ...but never before min_runs.
    assert len(rr.time_calls(lambda: time.sleep(0.02), 0, 100, time_budget_s=0.001, min_runs=4)) == 4


IO = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
      "dtypes": {"input_ids": "int64", "attention_mask": "int64"}}


def test_case_inputs_real_and_synthetic():
    ex = {"input_ids": np.arange(12).reshape(3, 4), "attention_mask": np.ones((3, 4), dtype=np.int64)}
    out = rr.case_inputs(IO, batch=5, seq=6, examples=ex)
    assert out["input_ids"].shape == (5, 6) and out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"][3, :4], ex["input_ids"][0])  # rows cycle
    np.testing.assert_array_equal(out["attention_mask"][:, 4:], 0)  # padding is masked
    assert rr.case_inputs(IO, 2, 2, ex)["input_ids"].tolist() == [[0, 1], [4, 5]]
    syn = rr.case_inputs(IO, 3, 8, vocab_size=50)
    assert syn["input_ids"].max() < 50 and syn["attention_mask"].all()


def test_static_shapes_are_reported():
    meta = {"io": {**IO, "dynamic_axes": {}}, "max_length": 16}
    assert "static batch" in rr.static_shape_reason(meta, 8, 16)
    assert "static sequence length of 16" in rr.static_shape_reason(meta, 1, 32)
    assert rr.static_shape_reason(meta, 1, 16) is None
    bounded = {"io": {**IO, "dynamic_axes": {n: {"0": "batch", "1": "sequence"} for n in IO["input_names"]}},
               "notes": {"bounds": {"batch": [1, 32], "sequence": [1, 16]}}}
    assert rr.static_shape_reason(bounded, 8, 16) is None
    assert rr.static_shape_reason(bounded, 64, 16) == "batch 64 is outside the artifact's bounds 1..32"
    assert "sequence 32" in rr.static_shape_reason(bounded, 1, 32)


def test_cpu_facts_and_environment():
    facts = rr.cpu_facts()
    assert facts["logical_cores"] >= 1 and facts["arch"]
    if sys.platform.startswith("linux"):
        assert facts["model"] and facts["flags"]
    assert set(rr.isa_features(["avx2", "amx_int8", "bogus"])) == {"avx2", "amx_int8"}
    env = rr.environment(threads=2)
    assert env["threads"]["requested"] == 2 and env["python"] and "numpy" in env["libraries"]


def test_peak_rss_sees_an_allocation():
    if not rr.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    before = rr.rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    peak = rr.peak_rss_bytes()
    del block
    assert peak - before >= 60 * 2**20


@pytest.mark.slow  # the shared tiny run takes ~10 s to export
def test_standalone_job_on_onnx(tiny_run, tmp_path):
    """The script as a device runs it: a separate python, only the copied folder and the job."""
    work = tmp_path / "device"
    shutil.copytree(tiny_run.run_dir / "export" / "onnx", work / "onnx")
    shutil.copy(rr.__file__, work / "remote_runner.py")
    np.savez(work / "eval.npz", **tiny_run.eval_inputs)
    job = {"name": "onnx", "folder": "onnx", "cases": [[1, 16], [4, 8]], "warmup": 2, "runs": 5, "threads": 1,
           "examples": "eval.npz", "eval_inputs": "eval.npz", "eval_batch_size": 16}
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "remote_runner.py", "job.json", "result.json"], cwd=work,
                          capture_output=True, text=True, timeout=120)
    result = json.loads((work / "result.json").read_text())
    assert proc.returncode == 0, result.get("traceback") or proc.stderr
    assert result["status"] == "ok" and result["runtime"]["runtime"] == "onnxruntime"
    assert [c["runs"] for c in result["cases"]] == [5, 5]
    assert [(c["batch"], c["seq"]) for c in result["cases"]] == [(1, 16), (4, 8)]
    assert result["load_s"] > 0 and result["first_inference_s"] > 0
    assert result["memory"]["peak_delta_mb"] > 0
    with np.load(work / result["eval_outputs"]) as z:
        logits = z["logits"]
    assert logits.shape == (len(tiny_run.labels), 2)
    # The same outputs as the model the artifact came from.
    import torch

    with torch.inference_mode():
        ref = tiny_run.module(**{k: torch.from_numpy(v) for k, v in tiny_run.eval_inputs.items()})[0].numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_failure_is_a_result_not_a_crash(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "artifact.json").write_text(json.dumps({"file": "model.xyz", "io": IO}))
    (tmp_path / "job.json").write_text(json.dumps({"name": "bad", "folder": "bad", "cases": [[1, 8]]}))
    assert rr.run_job(tmp_path / "job.json", tmp_path / "result.json") == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "error" and "cannot run 'model.xyz'" in result["error"]


class _Broken:
    input_names, output_names = IO["input_names"], IO["output_names"]

    def run(self, inputs):
        raise RuntimeError("kernel missing for this shape")


def test_every_case_failing_makes_the_result_an_error(tmp_path):
    meta = {"io": {**IO, "dynamic_axes": {}}, "max_length": 8}
    job = {"name": "broken", "cases": [[1, 8]], "warmup": 0, "runs": 2, "in_process": True}
    res, _ = rr.measure(_Broken, job, tmp_path, meta)
    assert res["status"] == "error" and "kernel missing" in res["error"]
    assert res["cases"][0]["error"] == "RuntimeError: kernel missing for this shape"


def test_runtimes_that_plan_memory_get_batches_they_accept(tmp_path):
    """A runner with max_batch (ExecuTorch plans memory ahead) is scored in batches it accepts, and a
    timing case above it is skipped with the reason instead of failing the whole artifact."""

    class Planned:
        max_batch = 2
        input_names, output_names = ["images"], ["scores"]

        def __init__(self):
            self.seen = []

        def run(self, inputs):
            n = len(inputs["images"])
            assert n <= self.max_batch, n
            self.seen.append(n)
            return {"scores": inputs["images"].reshape(n, -1).sum(1, keepdims=True)}

    runner = Planned()
    images = np.arange(5 * 3, dtype=np.float32).reshape(5, 3, 1, 1)
    out = rr.run_dataset(runner, {"images": images}, 32)
    assert runner.seen == [2, 2, 1] and out["scores"].ravel().tolist() == images.reshape(5, -1).sum(1).tolist()

    meta = {"io": {"input_names": ["images"], "output_names": ["scores"], "dynamic_axes": {"images": {"0": "batch"}}}}
    np.savez(tmp_path / "examples.npz", images=images)
    job = {"name": "planned", "cases": [[1, None], [8, None]], "warmup": 0, "runs": 2, "min_runs": 1,
           "in_process": True, "examples": "examples.npz"}
    result, _ = rr.measure(Planned, job, tmp_path, meta)
    cases = {c["batch"]: c for c in result["cases"]}
    assert "p50_ms" in cases[1] and "planned maximum batch 2" in cases[8]["skipped"]


def test_dynamic_int8_is_scored_one_text_per_call_at_its_own_length(tmp_path):
    """Dynamic int8 answers a text differently beside other texts (one activation scale per call), and
    is served one text per call: bench scores it so, each text cut to its own length; other
    precisions keep their batches."""

    class Recorder:
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

        def __init__(self):
            self.seen = []

        def run(self, inputs):
            self.seen.append(inputs["input_ids"].shape)
            # The answer depends on the whole call, as dynamic int8's does.
            return {"logits": np.full((len(inputs["input_ids"]), 2), float(inputs["input_ids"].shape[1]))}

    lengths = np.array([2, 5, 3, 1])
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, 7, 0)
    assert {k: v.tolist() for k, v in rr.own_length_row({"input_ids": ids, "attention_mask": mask}, 2).items()} == {
        "input_ids": [[7, 7, 7]], "attention_mask": [[1, 1, 1]]}
    np.savez(tmp_path / "evals.npz", input_ids=ids, attention_mask=mask)
    meta = {"io": {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
                   "dynamic_axes": {"input_ids": {"0": "b", "1": "s"}, "attention_mask": {"0": "b", "1": "s"}}}}
    job = {"name": "m", "cases": [], "in_process": True, "eval_inputs": "evals.npz", "eval_batch_size": 32}
    for precision, calls, widths in (("int8-dynamic", [(1, 2), (1, 5), (1, 3), (1, 1)], [2, 5, 3, 1]),
                                     ("int8-static", [(4, 5)], [5, 5, 5, 5])):
        runner = Recorder()
        result, outputs = rr.measure(lambda runner=runner: runner, job, tmp_path, {**meta, "precision": precision})
        assert runner.seen == calls and outputs["logits"][:, 0].tolist() == widths
        assert ("eval_rows_per_call" in result) == (precision == "int8-dynamic")


def _padded(lengths, width):
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, np.arange(1, width + 1)[None, :] * 10 + np.arange(len(lengths))[:, None], 0)
    return {"input_ids": ids, "attention_mask": mask}


class _Shapes:
    """Records each call's shape; answers per row from the marked tokens only (as a masked model does),
    plus a per-token output when asked."""

    def __init__(self, per_token=False):
        self.seen, self.per_token = [], per_token

    def run(self, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.seen.append(ids.shape)
        out = {"logits": np.stack([(ids * mask).sum(1), mask.sum(1)], axis=1).astype(np.float32)}
        if self.per_token:
            out["tokens"] = (ids * mask).astype(np.float32)
        return out


def test_scoring_runs_length_sorted_batches_cut_to_their_longest_text():
    """Bench scores token inputs in batches of similar lengths, each cut to its longest text: the
    outputs are the padded run's, row for row, from narrower calls."""
    lengths = [3, 9, 1, 9, 2, 5, 4]
    inputs = _padded(lengths, 10)
    plain = _Shapes()
    want = rr.run_dataset(plain, inputs, 3)
    assert plain.seen == [(3, 10), (3, 10), (1, 10)]
    trimmed = _Shapes()
    got = rr.run_dataset(trimmed, inputs, 3, trim_ok=lambda b, w: True)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    assert got["logits"][:, 1].tolist() == lengths  # each row back in its place
    assert trimmed.seen == [(3, 3), (3, 9), (1, 9)]  # sorted 1,2,3 | 4,5,9 | 9


def test_scoring_keeps_the_full_width_where_the_runtime_needs_it():
    """A batch the artifact cannot take at its width (static sequence, bounds) runs at the full width;
    outputs with a sequence axis are not trimmed at all."""
    inputs = _padded([3, 9, 1, 9, 2, 5, 4], 10)
    refusing = _Shapes()
    got = rr.run_dataset(refusing, inputs, 3, trim_ok=lambda b, w: w >= 9)
    assert refusing.seen == [(3, 10), (3, 9), (1, 9)]
    assert got["logits"][:, 1].tolist() == [3, 9, 1, 9, 2, 5, 4]

    want = rr.run_dataset(_Shapes(per_token=True), inputs, 3)
    got = rr.run_dataset(_Shapes(per_token=True), inputs, 3, trim_ok=lambda b, w: True)
    assert got["tokens"].shape == (7, 10)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["logits"], want["logits"])



def test_the_worker_cuts_batches_only_where_the_artifact_takes_the_width(tmp_path):
    """measure() scores a dynamic-sequence artifact in cut batches and one with a static sequence axis
    at its exported width, with the same answers."""
    lengths = [3, 9, 1, 9, 2, 5, 4]
    np.savez(tmp_path / "evals.npz", **_padded(lengths, 10))
    job = {"name": "m", "cases": [], "in_process": True, "eval_inputs": "evals.npz", "eval_batch_size": 3}
    io = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    dynamic = {"io": {**io, "dynamic_axes": {n: {"0": "b", "1": "s"} for n in io["input_names"]}}}
    static = {"io": {**io, "dynamic_axes": {n: {"0": "b"} for n in io["input_names"]}}, "max_length": 10}
    seen = {}
    for name, meta in (("dynamic", dynamic), ("static", static)):
        runner = _Shapes()
        _, outputs = rr.measure(lambda runner=runner: runner, job, tmp_path, {**meta, "precision": "fp32"})
        seen[name] = (runner.seen, outputs["logits"])
    assert seen["dynamic"][0] == [(3, 3), (3, 9), (1, 9)] and {s[1] for s in seen["static"][0]} == {10}
    np.testing.assert_array_equal(seen["dynamic"][1], seen["static"][1])
    assert seen["dynamic"][1][:, 1].tolist() == lengths


def test_a_round_times_its_own_slice_of_the_plan(tmp_path):
    """With ``call_offset`` the warm-up calls are the plan's first ones and the timed calls start that
    many calls after them: the rounds of a bench time consecutive slices, not the same texts again."""
    seen = []

    class Recorder:
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

        def run(self, inputs):
            seen.append(int(inputs["input_ids"][0, 0]))
            return {"logits": np.zeros((1, 2), np.float32)}

    ids = np.arange(20, dtype=np.int64).reshape(20, 1) + 100
    np.savez(tmp_path / "examples.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.savez(tmp_path / "plan.npz", b1=np.arange(20).reshape(20, 1))
    meta = {"io": {**IO, "dynamic_axes": {"input_ids": {"0": "batch", "1": "sequence"}}}}
    job = {"name": "r", "cases": [[1, "real"]], "warmup": 2, "runs": 3, "call_offset": 5, "in_process": True,
           "examples": "examples.npz", "plan": "plan.npz"}
    result, _ = rr.measure(Recorder, job, tmp_path, meta)
    case = result["cases"][0]
    # The first-inference probe (call 0), two warm-up calls, then calls 2+5 .. 2+5+3 of the plan.
    assert seen == [100, 100, 101, 107, 108, 109]
    assert case["runs"] == 3 and len(case["times_ms"]) == 3
    assert case["p50_ms"] == pytest.approx(float(np.median(case["times_ms"])), abs=1e-5)
