"""Benchmarking over SSH against a real OpenSSH server on 127.0.0.1, started and stopped by the test.

Needs the openssh-server and openssh-client packages (apt-get install -y openssh-server
openssh-client); skips with that reason when sshd is absent. Nothing is mocked: keys, host key,
known_hosts and the server's configuration live in a temporary folder.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgekd.devices.bench import bench_run
from edgekd.devices.profiles import load_profile
from edgekd.devices.remote import SSH, RemoteError
from edgekd.recipe import BenchConfig
from edgekd.tasks.text.task import classification_metrics

SSHD = "/usr/sbin/sshd"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    missing = [t for t in (SSHD, "ssh", "scp", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"OpenSSH is not installed ({', '.join(missing)} missing): "
                    "apt-get install -y openssh-server openssh-client")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # sshd started as root refuses to run without its privilege-separation folder, which the
        # distribution's service unit normally creates at boot.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
        "Subsystem sftp internal-sftp\n"  # scp speaks SFTP since OpenSSH 9
    )
    log = open(d / "sshd.log", "w")  # noqa: SIM115 -- closed after the server stops
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"sshd exited at start: {(d / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"dir": d, "port": port}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _profile(sshd, tmp_path: Path, key: str = "user_key", transfer: str = "scp") -> Path:
    d = sshd["dir"]
    data = {
        "name": "loopback-ssh",
        "description": "This machine reached over SSH on 127.0.0.1 (test server).",
        "processor": "same as local",
        "targets": ["onnx"],
        "runtimes": ["onnxruntime"],
        "onnx_providers": ["CPUExecutionProvider"],
        "threads": 1,
        "connection": {
            "kind": "ssh", "host": "127.0.0.1", "port": sshd["port"], "user": getpass.getuser(),
            "key_file": str(d / key), "python": sys.executable, "work_dir": str(tmp_path / "device"),
            "strict_host_key_checking": "accept-new", "known_hosts_file": str(tmp_path / "known_hosts"),
            "connect_timeout_s": 5, "transfer": transfer,
        },
    }
    path = tmp_path / "loopback-ssh.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("transfer", ["scp", "rsync"])
def test_bench_over_ssh(sshd, tiny_run, tmp_path, transfer):
    if transfer == "rsync" and shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install -y rsync)")
    profile = _profile(sshd, tmp_path, transfer=transfer)
    cfg = BenchConfig(warmup=1, runs=5, batch_sizes=[1, 2])
    summary = bench_run(tiny_run.run_dir, str(profile), cfg, tiny_run.eval_inputs, tiny_run.labels,
                        classification_metrics, torch_models={"student": (tiny_run.module, tiny_run.io)})
    models = summary["models"]
    assert models["onnx"]["status"] == "ok" and models["onnx-int8"]["status"] == "ok", models
    assert models["onnx"]["p50_ms"] > 0 and models["onnx"]["accuracy"] is not None
    assert models["tensorrt"]["status"] == "skipped"
    assert models["pytorch-student"]["status"] == "skipped"  # eager models run on the local profile only
    import json

    data = json.loads((tiny_run.run_dir / "bench" / "loopback-ssh" / "results.json").read_text())
    assert data["environment"]["connection"]["host"] == "127.0.0.1"
    onnx = next(e for e in data["results"] if e["name"] == "onnx")
    assert onnx["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert onnx["environment"]["threads"]["env"]["OMP_NUM_THREADS"] == "1"
    assert [c["batch"] for c in onnx["cases"]] == [1, 2]
    # The work folder on the device is removed afterwards.
    assert list((tmp_path / "device").iterdir()) == []


def test_wrong_key_fails_fast_with_ssh_message(sshd, tmp_path):
    prof = load_profile(_profile(sshd, tmp_path, key="other_key"))
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="Permission denied"):
        SSH(prof.connection).run("true", timeout=30)
    assert time.monotonic() - t0 < 20  # BatchMode: no password prompt to wait on


def test_strict_host_key_checking_yes_rejects_unknown_host(sshd, tmp_path):
    path = _profile(sshd, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["connection"]["strict_host_key_checking"] = "yes"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RemoteError, match="(?i)host key"):
        SSH(load_profile(path).connection).run("true", timeout=30)


def test_ssh_bench_skips_a_failed_parity_folder_and_times_on_the_devices_cores(sshd, tiny_run, tmp_path):
    """A folder the export stage left with parity.passed: false is not measured over ssh either (a local
    bench refuses it too); a profile without threads or cores runs on the cores the device reports."""
    import json

    from edgekd.export.base import read_artifact_meta, write_artifact_meta

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    meta = read_artifact_meta(run / "export" / "onnx-int8")
    meta["parity"] = {"ran": True, "passed": False, "top1_agreement": 0.5, "max_abs_diff": 0.3}
    write_artifact_meta(run / "export" / "onnx-int8", meta)
    path = _profile(sshd, tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["threads"]
    path.write_text(yaml.safe_dump(data))
    summary = bench_run(run, str(path), BenchConfig(warmup=1, runs=3, rounds=1, batch_sizes=[1]),
                        tiny_run.eval_inputs, tiny_run.labels, classification_metrics)
    models = summary["models"]
    assert models["onnx"]["status"] == "ok" and models["onnx-int8"]["status"] == "skipped", models
    results = json.loads((run / "bench" / "loopback-ssh" / "results.json").read_text())
    int8 = next(e for e in results["results"] if e["name"] == "onnx-int8")
    assert int8["reason"].startswith("failed its parity check against the source model")
    cores = results["environment"]["cpu"]["logical_cores"]  # as the device reported it
    assert results["inputs"]["threads"] == cores
    onnx = next(e for e in results["results"] if e["name"] == "onnx")
    assert onnx["environment"]["threads"]["env"]["OMP_NUM_THREADS"] == str(cores)
    table = (run / "bench" / "loopback-ssh" / "table.md").read_text()
    assert f"threads: {cores} (all the device's logical cores)" in table
