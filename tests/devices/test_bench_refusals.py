"""What the bench refuses or skips, alike on every connection, and the threads a remote device is timed on:

1. a folder whose parity check failed at export (``parity.passed: false``) is skipped by ``discover`` (so
   an ssh or phone bench never measures it), and the device's runner refuses it, and an artifact whose
   sha256 is not its artifact.json's, as edgekd's own loader does;
2. a remote profile with neither threads nor cores is timed on the device's cores (its environment probe),
   never this machine's, and the table says which; a phone's count, which cannot be read, is asked for;
3. a profile's ``runtimes`` mean something: a target needs its runtime, the eager PyTorch rows ``pytorch``;
4. an unreadable artifact.json is a skipped row naming the file and saying to re-export.

Fast and offline: hand-written export folders, an ssh client faked where a device would answer."""

from __future__ import annotations

import getpass
import json
import os
from importlib import resources

import pytest
import yaml

from edgekd.devices import bench, remote
from edgekd.devices import remote_runner as rr
from edgekd.devices.profiles import ProfileError, list_profiles, load_profile
from edgekd.errors import ParityError, RecipeError
from edgekd.recipe import BenchConfig

IO = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
      "dtypes": {"input_ids": "int64", "attention_mask": "int64"},
      "dynamic_axes": {"input_ids": {"0": "batch", "1": "sequence"}, "attention_mask": {"0": "batch", "1": "sequence"}}}
FAILED = {"ran": True, "passed": False, "top1_agreement": 0.5, "max_abs_diff": 0.25}


def _folder(run_dir, name="onnx", parity=None, content=b"not a real model", **meta):
    """An export folder as the export stage leaves it: artifact.json beside its file."""
    from edgekd.export.base import write_artifact_meta
    from edgekd.export.stage import artifact_digest

    folder = run_dir / "export" / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(content)
    write_artifact_meta(folder, {"target": "onnx", "exporter": "onnx", "file": "model.onnx", "precision": "fp32",
                                 "io": IO, "max_length": 16, "built": True, "parity": parity,
                                 "sha256": artifact_digest(folder / "model.onnx"), **meta})
    return folder


class _FakeSSH:
    """A device that answers its environment probe with ``env`` and writes no results; records the jobs
    copied to it and the commands run there."""

    env: dict = {}
    jobs: list[dict] = []
    commands: list[str] = []
    copied: list[str] = []

    def __init__(self, conn):
        self.conn = conn

    def destination(self):
        return "fake"

    def put(self, sources, remote_dir, timeout=None):
        _FakeSSH.copied += [p.name for p in sources]
        _FakeSSH.jobs += [json.loads(p.read_text()) for p in sources if p.name.startswith("job-")]

    def get(self, remote_paths, local_dir, timeout=None):
        raise AssertionError("nothing to fetch: the fake device writes no result")

    def run(self, command, timeout=None, what=""):
        _FakeSSH.commands.append(command)
        return json.dumps(_FakeSSH.env) if "--env" in command else ""


def _ssh_profile(tmp_path, **keys):
    path = tmp_path / "ssh-dev.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ssh-dev", "description": "A device over ssh (faked).", "processor": "test", "targets": ["onnx"],
        "runtimes": ["onnxruntime"], **keys,
        "connection": {"kind": "ssh", "host": "127.0.0.1", "user": getpass.getuser(), "python": "python3"}}))
    return path


@pytest.fixture
def fake_ssh(monkeypatch):
    _FakeSSH.env, _FakeSSH.jobs, _FakeSSH.commands, _FakeSSH.copied = {}, [], [], []
    monkeypatch.setattr(remote, "SSH", _FakeSSH)
    monkeypatch.setattr(remote, "_preflight", lambda ssh, python: None)
    return _FakeSSH


FAST = {"warmup": 1, "runs": 2, "rounds": 1, "batch_sizes": [1], "inputs": "synthetic"}


# --- 1. a folder that failed its parity check -----------------------------------------------------


def test_discover_skips_a_folder_that_failed_parity_with_its_figures(tmp_path):
    _folder(tmp_path, "onnx", parity=FAILED)
    _folder(tmp_path, "onnx-ok", parity={"ran": True, "passed": True})
    found = {e["name"]: e for e in bench.discover(tmp_path)}
    assert found["onnx"]["status"] == "skipped"
    assert found["onnx"]["reason"].startswith("failed its parity check against the source model when it was "
                                              "exported (top1_agreement 0.5, max_abs_diff 0.25)")
    assert "Re-export it" in found["onnx"]["reason"]
    assert "status" not in found["onnx-ok"]


def test_an_ssh_bench_skips_a_folder_that_failed_parity_and_copies_nothing(tmp_path, fake_ssh):
    _folder(tmp_path / "run", "onnx", parity=FAILED)
    summary = bench.bench_run(tmp_path / "run", str(_ssh_profile(tmp_path, threads=1)), BenchConfig(**FAST))
    row = summary["models"]["onnx"]
    assert row["status"] == "skipped", row
    data = json.loads((tmp_path / "run" / "bench" / "ssh-dev" / "results.json").read_text())
    assert "failed its parity check" in data["results"][0]["reason"]
    assert fake_ssh.jobs == [] and fake_ssh.commands == []  # the device is not even reached


def test_the_device_runner_refuses_what_edgekds_loader_refuses(tmp_path):
    """load_standalone runs on the device without edgekd: its refusals are edgekd's own, word for word."""
    from edgekd.export.stage import artifact_digest, load_artifact

    folder = _folder(tmp_path, "onnx", parity=FAILED)
    meta = rr.read_meta(folder)
    with pytest.raises(ParityError) as edgekd_says:
        load_artifact(folder)
    with pytest.raises(ValueError, match="failed its parity check") as device_says:
        rr.load_standalone(folder, meta, 1, None)
    assert str(edgekd_says.value).startswith(str(device_says.value).rstrip("."))
    with pytest.raises(ValueError, match="failed its parity check"):  # verified or not
        rr.load_standalone(folder, meta, 1, None, verify=False)
    # The digest the device checks is the one artifact.json records, for a file and for a package folder.
    assert rr.artifact_sha256(folder / "model.onnx") == artifact_digest(folder / "model.onnx") == meta["sha256"]
    package = tmp_path / "model.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "weights.bin").write_bytes(b"\x00\x01")
    assert rr.artifact_sha256(package) == artifact_digest(package)


def test_the_device_runner_refuses_an_artifact_that_changed_after_export(tmp_path):
    folder = _folder(tmp_path, "onnx")
    (folder / "model.onnx").write_bytes(b"another model")
    with pytest.raises(ValueError, match="does not match the sha256 in its artifact.json"):
        rr.load_standalone(folder, rr.read_meta(folder), 1, None)


@pytest.mark.parametrize("what", ["parity", "sha256"])
def test_a_job_on_a_refused_folder_is_an_error_result_naming_why(tmp_path, what):
    folder = _folder(tmp_path, "onnx", parity=FAILED if what == "parity" else None)
    if what == "sha256":
        (folder / "model.onnx").write_bytes(b"copied in part")
    (tmp_path / "job.json").write_text(json.dumps({"name": "onnx", "folder": "export/onnx", "cases": [[1, 8]]}))
    assert rr.run_job(tmp_path / "job.json", tmp_path / "result.json") == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "error"
    assert ("failed its parity check" if what == "parity" else "does not match the sha256") in result["error"]


# --- 2. a remote device's threads -------------------------------------------------------------------


def test_a_remote_profile_without_threads_or_cores_is_timed_on_the_devices_cores(tmp_path, fake_ssh):
    device_cores = (os.cpu_count() or 1) + 5  # not this machine's count
    fake_ssh.env = {"cpu": {"model": "Device CPU", "logical_cores": device_cores}, "threads": {"requested": None}}
    _folder(tmp_path / "run", "onnx")
    bench.bench_run(tmp_path / "run", str(_ssh_profile(tmp_path)), BenchConfig(**FAST))
    assert fake_ssh.jobs and {j["threads"] for j in fake_ssh.jobs} == {device_cores}
    bench_cmd = next(c for c in fake_ssh.commands if "job-onnx" in c)
    assert f"OMP_NUM_THREADS={device_cores}" in bench_cmd
    out = tmp_path / "run" / "bench" / "ssh-dev"
    data = json.loads((out / "results.json").read_text())
    assert data["inputs"]["threads"] == device_cores == data["environment"]["threads"]["requested"]
    assert f"threads: {device_cores} (all the device's logical cores)" in (out / "table.md").read_text()


def test_the_profiles_own_threads_win_and_the_table_says_whose(tmp_path, fake_ssh):
    fake_ssh.env = {"cpu": {"logical_cores": 64}}
    _folder(tmp_path / "run", "onnx")
    bench.bench_run(tmp_path / "run", str(_ssh_profile(tmp_path, cores=4)), BenchConfig(**FAST))
    assert {j["threads"] for j in fake_ssh.jobs} == {4}
    assert "threads: 4 (the profile's cores)" in (tmp_path / "run" / "bench" / "ssh-dev" / "table.md").read_text()


def test_a_device_that_does_not_report_its_cores_asks_for_threads(tmp_path, fake_ssh):
    fake_ssh.env = {"cpu": {"logical_cores": None}}
    _folder(tmp_path / "run", "onnx")
    with pytest.raises(ProfileError, match="sets neither threads nor cores.*set threads \\(or cores\\) in the profile"):
        bench.bench_run(tmp_path / "run", str(_ssh_profile(tmp_path)), BenchConfig(**FAST))
    assert fake_ssh.jobs == []
    assert any(c.startswith("rm -rf") for c in fake_ssh.commands)  # the work folder is still removed


def test_bench_threads_never_takes_this_machines_count_for_another_device(tmp_path):
    assert load_profile("local").bench_threads() == os.cpu_count()
    gpu = load_profile("nvidia-datacenter-gpu")  # ssh, neither threads nor cores
    assert gpu.bench_threads(device_cores=96) == 96
    with pytest.raises(ProfileError, match="sets neither threads nor cores"):
        gpu.bench_threads()


def test_a_phone_profile_without_threads_or_cores_is_refused_before_anything_runs(tmp_path):
    data = yaml.safe_load((resources.files("edgekd.devices") / "profiles" / "android-executorch.yaml").read_text())
    del data["threads"], data["cores"]
    path = tmp_path / "phone.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="bench.threads: the profile 'android-executorch' sets neither threads nor "
                                          "cores"):
        bench.bench_run(tmp_path, str(path), BenchConfig())
    assert bench.config_problems(BenchConfig(threads=4), load_profile(path)) == []


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_is_benched_as_it_is(name):
    assert bench.config_problems(BenchConfig(), load_profile(name, detect=False)) == []


# --- 3. runtimes ------------------------------------------------------------------------------------


def test_a_target_whose_runtime_the_profile_does_not_list_is_refused(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"name": "mixed", "description": "d", "processor": "p",
                                    "targets": ["onnx", "torchscript-lite"], "runtimes": ["tensorrt"],
                                    "connection": {"kind": "ssh", "host": "h"}}))
    with pytest.raises(ProfileError, match="targets: onnx runs on onnxruntime; torchscript-lite runs on pytorch, "
                                           "which runtimes \\(tensorrt\\) does not list"):
        load_profile(path)


def test_every_target_has_a_runtime_and_every_shipped_profile_lists_its_targets_runtimes():
    from edgekd.devices.profiles import RUNTIMES, TARGET_RUNTIME, TARGETS

    assert set(TARGETS) == set(TARGET_RUNTIME) and set(TARGET_RUNTIME.values()) <= set(RUNTIMES)
    for name in list_profiles():
        prof = load_profile(name, detect=False)
        assert all(prof.runs_target(t) for t in prof.targets), name


def test_eager_pytorch_rows_only_where_the_profile_lists_pytorch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from edgekd.tasks.text.task import TEXT_IO

    measured = []
    monkeypatch.setattr(bench, "_measure_local", lambda entries, *a: measured.extend(
        e["name"] for e in entries if not e.get("status")))
    path = tmp_path / "onnx-only.yaml"
    path.write_text(yaml.safe_dump({"name": "onnx-only", "description": "This machine, ONNX Runtime only.",
                                    "processor": "auto", "auto_detect": True, "targets": ["onnx"],
                                    "runtimes": ["onnxruntime"], "connection": {"kind": "local"}}))
    models = {"student": (torch.nn.Linear(2, 2), TEXT_IO)}
    summary = bench.bench_run(tmp_path / "run", str(path), BenchConfig(**FAST), torch_models=models)
    assert summary["models"]["pytorch-student"]["status"] == "skipped" and measured == []
    data = json.loads((tmp_path / "run" / "bench" / "onnx-only" / "results.json").read_text())
    assert "does not list the pytorch runtime" in data["results"][0]["reason"]
    bench.bench_run(tmp_path / "run", "local", BenchConfig(**FAST), torch_models=models)
    assert measured == ["pytorch-student"]  # the local profile lists pytorch


# --- 4. an unreadable artifact.json ------------------------------------------------------------------


def test_a_truncated_artifact_json_is_a_skipped_row_naming_the_file(tmp_path):
    _folder(tmp_path, "onnx")
    broken = _folder(tmp_path, "onnx-int8")
    text = (broken / "artifact.json").read_text()
    (broken / "artifact.json").write_text(text[: len(text) // 2])
    found = {e["name"]: e for e in bench.discover(tmp_path)}
    assert "status" not in found["onnx"]
    assert found["onnx-int8"]["status"] == "skipped"
    reason = found["onnx-int8"]["reason"]
    assert str(broken / "artifact.json") in reason and "is not valid JSON" in reason and "re-export" in reason
