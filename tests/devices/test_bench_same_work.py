"""Every row of a bench does the same work for each figure it shows, locally and over ssh alike: peak
memory covers loading and timing only (scoring differs between rows), the ssh bench builds the case list
a local one builds, the standalone ExecuTorch runner applies the bench's threads and its planned batch
as edgekd's own runner does, and settings an in-process bench cannot apply are refused. Fake runners,
fake runtime modules and a fake ssh: fast and offline."""

from __future__ import annotations

import getpass
import json
import sys
import types

import numpy as np
import pytest
import yaml

from edgekd.devices import bench, measure, remote, tables
from edgekd.devices import remote_runner as rr
from edgekd.devices.profiles import load_profile
from edgekd.errors import RecipeError
from edgekd.recipe import BenchConfig

IO = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
      "dtypes": {"input_ids": "int64", "attention_mask": "int64"},
      "dynamic_axes": {"input_ids": {"0": "batch", "1": "sequence"},
                       "attention_mask": {"0": "batch", "1": "sequence"}}}


def _texts(rows: int, width: int) -> dict[str, np.ndarray]:
    mask = np.zeros((rows, width), dtype=np.int64)
    for i in range(rows):
        mask[i, : 2 + i % (width - 2)] = 1
    return {"input_ids": (np.arange(rows * width).reshape(rows, width) % 50 + 1) * mask, "attention_mask": mask}


# --- 1. peak memory: the same work in every row ---------------------------------------------------


class _BigBatches:
    """Scoring batches (several rows) allocate a large transient buffer, as a batch of 32 texts does;
    the timed calls (one row) do not."""

    input_names, output_names = IO["input_names"], IO["output_names"]

    def run(self, inputs):
        n = len(inputs["input_ids"])
        if n > 1:
            block = np.ones(96 * 2**20 // 8)  # 96 MiB, every page written
            assert block[-1] == 1.0
        return {"logits": np.zeros((n, 2), dtype=np.float32)}


def test_peak_memory_is_read_over_loading_and_timing_before_any_scoring(tmp_path):
    if not rr.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    np.savez(tmp_path / "eval.npz", **_texts(16, 8))
    job = {"name": "scored", "cases": [[1, 8]], "warmup": 1, "runs": 3, "eval_inputs": "eval.npz",
           "eval_batch_size": 8}
    res, outputs = rr.measure(_BigBatches, job, tmp_path, {"io": IO, "max_length": 8})
    assert res["status"] == "ok" and outputs["logits"].shape == (16, 2)  # it was scored, in batches of 8
    # The 96 MiB of the scoring batches are not in the figure: a row scored elsewhere (no eval inputs)
    # or one text per call (dynamic int8) does no such work, and its figure would not be comparable.
    assert res["memory"]["peak_delta_mb"] < 60, res["memory"]
    assert res["memory"]["peak_covers"] == rr.PEAK_COVERS


def _row(name, memory):
    return {"name": name, "kind": "artifact", "target": "onnx", "precision": "fp32", "status": "ok",
            "accuracy": 0.8, "size_bytes": 2**20, "memory": memory,
            "cases": [{"batch": 1, "seq": "real", "runs": 5, "p50_ms": 1.0, "p99_ms": 1.2, "mean_ms": 1.0,
                       "throughput": 1000.0, "inputs_sha256": "ab" * 32}]}


def _data(rows):
    return {"run": "run", "profile": {"name": "local", "processor": "auto"},
            "config": {"runs": 5, "warmup": 1, "time_budget_s": None}, "headline": {"batch": 1, "seq": "real"},
            "inputs": {"mode": "real", "description": "real lengths", "source": "real", "timed_calls": 5,
                       "warmup_calls": 1, "rounds": 1, "threads": 2},
            "metric": "accuracy", "reference": {"teacher": 0.8, "student": 0.8, "source": "caller"},
            "environment": {"cpu": {"model": "Test CPU"}}, "results": rows}


def test_the_table_says_what_the_peak_covers_and_names_rows_whose_peak_included_scoring():
    now = {"peak_delta_mb": 40.0, "load_delta_mb": 30.0, "peak_covers": rr.PEAK_COVERS}
    text = tables.markdown(_data([_row("onnx", now), _row("onnx-int8", now)]))
    assert "Peak MB: each measuring process's peak" in text and "before any scoring" in text
    older = {"peak_delta_mb": 140.0, "load_delta_mb": 30.0}  # results.json written before: read after scoring
    text = tables.markdown(_data([_row("onnx", now), _row("pytorch-teacher", older)]))
    assert "Peak MB of pytorch-teacher: read after scoring" in text and "not comparable" in text


# --- 2. the standalone ExecuTorch runner: threads and planned batch -------------------------------


class _Meta:
    def __init__(self, sizes):
        self._sizes = sizes

    def input_tensor_meta(self, i):
        return types.SimpleNamespace(sizes=lambda: self._sizes[i])


class _Method:
    """A program planned for batches up to 4: a bigger one fails, as ExecuTorch's planned memory does."""

    def __init__(self):
        self.metadata = _Meta([(4, 16), (4, 16)])
        self.batches = []

    def execute(self, tensors):
        import torch

        n = tensors[0].shape[0]
        if n > 4:
            raise RuntimeError(f"batch {n} exceeds the planned 4")
        self.batches.append(n)
        return [torch.zeros((n, 2))]


def _fake_executorch(monkeypatch, pool: dict | None):
    """Fake ``executorch.runtime`` (and its thread-pool binding, or none where ``pool`` is None)."""
    method = _Method()
    program = types.SimpleNamespace(load_method=lambda name: method)
    runtime = types.ModuleType("executorch.runtime")
    runtime.Runtime = types.SimpleNamespace(get=lambda: types.SimpleNamespace(load_program=lambda path: program))
    for name in ("executorch", "executorch.extension", "executorch.extension.pybindings"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "executorch.runtime", runtime)
    if pool is None:
        monkeypatch.setitem(sys.modules, "executorch.extension.pybindings.portable_lib", None)  # ImportError
    else:
        lib = types.ModuleType("executorch.extension.pybindings.portable_lib")
        lib._unsafe_reset_threadpool = lambda n: pool.update(size=n)
        lib._threadpool_get_thread_count = lambda: pool["size"]
        monkeypatch.setitem(sys.modules, "executorch.extension.pybindings.portable_lib", lib)
    return method


def _pte_job(tmp_path, threads):
    folder = tmp_path / "executorch"
    folder.mkdir()
    (folder / "model.pte").write_bytes(b"not read by the fake runtime")
    meta = {"file": "model.pte", "target": "executorch", "precision": "fp32", "max_length": 16, "io": IO,
            "notes": {"bounds": {"batch": [1, 4], "sequence": [1, 16]}}}
    (folder / "artifact.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "eval.npz", **_texts(10, 16))
    job = {"name": "executorch", "folder": "executorch", "cases": [[1, 16]], "warmup": 1, "runs": 2,
           "threads": threads, "eval_inputs": "eval.npz", "eval_batch_size": 32, "in_process": True}
    (tmp_path / "job.json").write_text(json.dumps(job))
    return tmp_path / "job.json"


def test_the_standalone_executorch_runner_applies_threads_and_scores_within_its_planned_batch(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pool = {"size": 8}
    method = _fake_executorch(monkeypatch, pool)
    assert rr.run_job(_pte_job(tmp_path, threads=3), tmp_path / "result.json") == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok", result.get("error")
    assert pool["size"] == 3 and result["runtime"]["threads"] == 3
    assert "threads_not_applied" not in result["runtime"]
    # bench.eval_batch_size 32 over a program planned for 4: capped, as the local runner is.
    assert result["eval_examples"] == 10 and max(method.batches) == 4


def test_the_standalone_executorch_runner_says_when_it_cannot_apply_threads(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    _fake_executorch(monkeypatch, pool=None)
    assert rr.run_job(_pte_job(tmp_path, threads=3), tmp_path / "result.json") == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert "threads" not in result["runtime"]
    assert result["runtime"]["threads_not_applied"].startswith("3 thread(s) not applied")
    row = {"name": "executorch", "status": "ok", "runtime": result["runtime"], "note": "accuracy: ..."}
    bench.add_runtime_notes(row)
    assert row["note"].startswith("3 thread(s) not applied") and row["note"].endswith("accuracy: ...")


def test_a_pool_that_does_not_take_the_threads_asked_is_an_error(monkeypatch):
    _fake_executorch(monkeypatch, pool={"size": 2})
    lib = sys.modules["executorch.extension.pybindings.portable_lib"]
    monkeypatch.setattr(lib, "_unsafe_reset_threadpool", lambda n: None)  # stays at 2
    with pytest.raises(ValueError, match="asked for 3 threads but runs 2"):
        rr.set_executorch_threads(3)


# --- 3. one case list, locally and over ssh -------------------------------------------------------


def _entries(tmp_path):
    folder = tmp_path / "run" / "export" / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    return [{"name": "onnx", "kind": "artifact", "target": "onnx", "exporter": "onnx", "folder": str(folder),
             "meta": {"max_length": 16}}]


def _local_cases(tmp_path, monkeypatch, cfg, inputs):
    seen = []

    def fake_run_job(job, workdir, isolate, timeout_s):
        seen.append(job["cases"])
        return {"name": job["name"], "status": "ok", "cases": []}, None

    class FakeAhead(measure.Prestarted):  # isolated: the jobs go to processes started ahead
        def run(self, job):
            return fake_run_job(job, self.workdir, True, self.timeout_s)

    monkeypatch.setattr(measure, "run_job", fake_run_job)
    monkeypatch.setattr(measure, "Prestarted", FakeAhead)
    work = tmp_path / "local-work"
    work.mkdir()
    bench._measure_local(_entries(tmp_path), load_profile("local"), cfg, inputs, work)
    assert seen
    return seen[0]


class _FakeSSH:
    """Records the jobs bench_ssh copies to the device; the device then writes no result."""

    jobs: list[dict] = []

    def __init__(self, conn):
        self.conn = conn

    def destination(self):
        return "fake"

    def put(self, sources, remote_dir, timeout=None):
        _FakeSSH.jobs += [json.loads(p.read_text()) for p in sources if p.name.startswith("job-")]

    def run(self, command, timeout=None, what=""):
        return "{}" if "--env" in command else ""


def _ssh_cases(tmp_path, monkeypatch, cfg, inputs):
    prof_path = tmp_path / "ssh-dev.yaml"
    prof_path.write_text(yaml.safe_dump({
        "name": "ssh-dev", "description": "A device over ssh (faked).", "processor": "test", "targets": ["onnx"],
        "runtimes": ["onnxruntime"], "threads": 1,
        "connection": {"kind": "ssh", "host": "127.0.0.1", "user": getpass.getuser(), "python": "python3"}}))
    _FakeSSH.jobs = []
    monkeypatch.setattr(remote, "SSH", _FakeSSH)
    monkeypatch.setattr(remote, "_preflight", lambda ssh, python: None)
    work = tmp_path / "ssh-work"
    work.mkdir()
    remote.bench_ssh(_entries(tmp_path), load_profile(prof_path), cfg, inputs, work, tmp_path / "run")
    assert _FakeSSH.jobs
    return _FakeSSH.jobs[0]["cases"]


@pytest.mark.parametrize("how", ["real", "synthetic", "no eval inputs", "seq_lengths"])
def test_ssh_times_the_cases_a_local_bench_times(tmp_path, monkeypatch, how):
    cfg = BenchConfig(batch_sizes=[1, 2], runs=2, warmup=1, rounds=1, inputs="synthetic" if how == "synthetic" else "real",
                      seq_lengths=[8] if how == "seq_lengths" else None)
    # Texts 12 tokens wide, artifacts of max_length 16: a length taken from one of them would show.
    inputs = measure.Inputs.from_config(cfg, None if how == "no eval inputs" else _texts(6, 12))
    local = _local_cases(tmp_path, monkeypatch, cfg, inputs)
    assert _ssh_cases(tmp_path, monkeypatch, cfg, inputs) == local
    expected = {"real": [[1, "real"], [2, "real"]], "synthetic": [[1, 12], [2, 12]],
                "no eval inputs": [[1, 16], [2, 16]], "seq_lengths": [[1, 8], [2, 8]]}[how]
    assert local == expected


# --- 4. an in-process bench refuses what it cannot apply ------------------------------------------


def test_an_in_process_bench_refuses_a_timeout_it_cannot_enforce(tmp_path):
    with pytest.raises(RecipeError, match=r"bench\.timeout_s: 60 s stops a measuring child process"):
        bench.bench_run(tmp_path, "local", BenchConfig(isolate=False, timeout_s=60))


def test_an_in_process_bench_refuses_a_profile_that_pins_cpus(tmp_path):
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pinned", "description": "This machine, pinned to CPU 0.", "processor": "auto", "auto_detect": True,
        "cpus": [0], "targets": ["onnx"], "runtimes": ["onnxruntime"], "connection": {"kind": "local"}}))
    with pytest.raises(RecipeError, match=r"cpus \[0\] cannot pin"):
        bench.bench_run(tmp_path, str(path), BenchConfig(isolate=False))
    # Each is fine where it applies: in child processes, or in process with the defaults.
    assert bench.config_problems(BenchConfig(timeout_s=60), load_profile(path)) == []
    assert bench.config_problems(BenchConfig(isolate=False), load_profile("local")) == []



def test_a_recipe_check_refuses_what_the_bench_would_not_apply_before_any_stage(tmp_path):
    """The same refusals up front (edgekd.recipe_check), and isolate: false on a profile that measures on its
    device, where every model runs in a process of its own whatever isolate says."""
    from edgekd.recipe import load_recipe
    from edgekd.recipe_check import check_inputs

    assert check_inputs(load_recipe("default", ["bench.isolate=false", "bench.timeout_s=60"]))[-1].startswith(
        "bench.timeout_s: 60 s stops a measuring child process")
    assert check_inputs(load_recipe("default", ["bench.profile=raspberry-pi-5", "bench.isolate=false"]))[-1] == (
        "bench.isolate: false measures in this process, and the profile 'raspberry-pi-5' measures on its device "
        "(ssh), each model in a process of its own there: drop bench.isolate")
    assert check_inputs(load_recipe("default", ["bench.profile=raspberry-pi-5"])) == []
