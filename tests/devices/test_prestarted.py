"""Measuring processes started ahead of their turn (``measure.Prestarted``): each imports its runtime, waits
for "go" before it loads anything, is stopped when not wanted, and a process that dies is reported as such,
never with an earlier round's figures."""

from __future__ import annotations

import json

import pytest

from edgekd.devices import measure


def _torch_job(name: str, **extra):
    """A job that gets as far as "ready" (torch imported) and fails once let go: its module file is missing,
    and is only read after "go"."""
    io = {"input_names": ["x"], "output_names": ["y"], "dynamic_axes": {}, "dtypes": {"x": "float32"}}
    return {"name": name, "kind": "torch", "module_file": f"missing-{name}.pt", "io": io, "preload": [],
            "device": "cpu", "cases": [[1, 4]], "warmup": 1, "runs": 1, "threads": 1, **extra}


def test_processes_wait_for_go_and_the_ones_left_are_stopped(tmp_path):
    a, b = _torch_job("a"), _torch_job("b")
    ahead = measure.Prestarted(tmp_path, timeout_s=120, width=2)
    ahead.plan([a, b])
    result, outputs = ahead.run(a)
    # Let go, it loaded its (missing) module: the error of its own load, written by itself.
    assert result["status"] == "error" and "missing-a.pt" in result["error"] and outputs is None
    started_b = ahead.started["b"]
    assert started_b.ready and started_b.proc.poll() is None  # started with a, imported, idle
    assert not (tmp_path / "result-b.json").exists()  # it has loaded nothing and written nothing
    ahead.close()
    assert started_b.proc.returncode is not None and not (tmp_path / "result-b.json").exists()
    assert ahead.started == {}


def test_a_planned_job_run_with_other_settings_is_started_afresh(tmp_path):
    a = _torch_job("a")
    with measure.Prestarted(tmp_path, timeout_s=120, width=2) as ahead:
        ahead.plan([_torch_job("x"), a])
        ahead.run(_torch_job("x"))
        planned = ahead.started["a"]
        result, _ = ahead.run({**a, "runs": 2})
        assert planned.proc.returncode is not None  # the process started for the planned copy was stopped
        assert result["status"] == "error" and "missing-a.pt" in result["error"]


def test_a_process_that_dies_is_reported_not_an_earlier_rounds_result(tmp_path):
    # An earlier round's result of the same model, left in the work folder.
    earlier = {"name": "a", "status": "ok", "cases": [{"batch": 1, "seq": 4, "p50_ms": 1.0}]}
    (tmp_path / "result-a.json").write_text(json.dumps(earlier))
    # It dies before it imports anything: no CPU with that number to pin it to.
    job = _torch_job("a", cpus=[10**6])
    with measure.Prestarted(tmp_path, timeout_s=120, width=1) as ahead:
        result, _ = ahead.run(job)
    assert result["status"] == "error" and result["error"].startswith("the measuring process exited with code")
    # The same without starting ahead.
    (tmp_path / "result-a.json").write_text(json.dumps(earlier))
    result, _ = measure.run_job(job, tmp_path, isolate=True, timeout_s=120)
    assert result["status"] == "error" and result["error"].startswith("the measuring process exited with code")


def test_a_process_too_slow_to_import_is_stopped(tmp_path):
    with measure.Prestarted(tmp_path, timeout_s=0.01, width=1) as ahead:
        result, _ = ahead.run(_torch_job("a"))
        assert result == {"name": "a", "status": "error", "error": "timed out after 0 s importing its runtime"}


def test_a_start_that_fails_leaves_no_process_behind(tmp_path, monkeypatch):
    """A process that cannot be started (too many processes, say) while others of its batch already run:
    the ones running are tracked, and stopped with the rest."""
    made = []
    real = measure._Started

    def start(job, workdir, spawn=None):
        if made:
            raise OSError("cannot start another process")
        made.append(real(job, workdir, spawn))
        return made[-1]

    monkeypatch.setattr(measure, "_Started", start)
    ahead = measure.Prestarted(tmp_path, timeout_s=120, width=2)
    ahead.plan([_torch_job("a"), _torch_job("b")])
    with pytest.raises(OSError, match="cannot start another process"):
        ahead.run(_torch_job("a"))
    assert made and made[0].proc.poll() is None  # started, and still running until the caller closes
    ahead.close()
    assert made[0].proc.returncode is not None


def test_a_profile_that_pins_cpus_starts_as_many_ahead_as_it_pins(tmp_path, monkeypatch):
    """Every measuring process is pinned to the profile's cpus from its start: started ahead, as many import side
    by side as those cpus hold, not as many as this machine has."""
    from edgekd.devices import bench
    from edgekd.devices.profiles import load_profile
    from edgekd.recipe import BenchConfig

    widths = []

    class Seen(measure.Prestarted):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            widths.append(self.width)

        def run(self, job):
            return {"name": job["name"], "status": "ok", "cases": []}, None

    monkeypatch.setattr(measure, "Prestarted", Seen)
    monkeypatch.setattr(measure, "usable_cpus", lambda: 4)
    folder = tmp_path / "run" / "export" / "onnx"
    folder.mkdir(parents=True)
    entries = lambda: [{"name": "onnx", "kind": "artifact", "target": "onnx", "exporter": "onnx",  # noqa: E731
                        "folder": str(folder), "meta": {"max_length": 16}}]
    cfg = BenchConfig(batch_sizes=[1], runs=2, warmup=1, rounds=1, inputs="synthetic")
    inputs = measure.Inputs.from_config(cfg, None)
    local = load_profile("local")
    for prof in (local, local.model_copy(update={"cpus": [0]})):
        work = tmp_path / f"work-{len(widths)}"
        work.mkdir()
        bench._measure_local(entries(), prof, cfg, inputs, work)
    assert widths == [4, 1]
