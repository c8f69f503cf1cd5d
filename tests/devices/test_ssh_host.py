"""A device profile's SSH host and user reach ssh only as a destination, never as an option."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from edgekd.devices.profiles import ProfileError, SSHConnection, load_profile
from edgekd.devices.remote import SSH


def _profile(tmp_path, host: str, user: str | None = "pi"):
    data = yaml.safe_load(_shipped().read_text())
    data["connection"]["host"] = host
    data["connection"]["user"] = user
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _shipped():
    from importlib import resources

    return resources.files("edgekd.devices").joinpath("profiles", "nvidia-datacenter-gpu.yaml")


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/pwned", "-p2222", "gpu server", "gpu\tserver",
                                  "gpu\nserver", "gpu\x00server", "gpu\x1b[31m", "root@gpu", ""])
def test_option_shaped_or_odd_host_is_a_profile_error(tmp_path, host):
    with pytest.raises(ProfileError, match="host"):
        load_profile(_profile(tmp_path, host), detect=False)


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "a b", "a\nb"])
def test_option_shaped_user_is_a_profile_error(tmp_path, user):
    with pytest.raises(ProfileError, match="user"):
        load_profile(_profile(tmp_path, "gpu-server", user), detect=False)


@pytest.mark.parametrize("host", ["gpu-server", "jetson.local", "10.0.0.5", "fe80::1%eth0", "[::1]", "my_alias"])
def test_ordinary_hosts_are_accepted(tmp_path, host):
    assert load_profile(_profile(tmp_path, host), detect=False).connection.host == host


def test_connection_built_in_code_is_checked_too():
    conn = SSHConnection.model_construct(**{**SSHConnection(host="ok").model_dump(), "host": "-oProxyCommand=x"})
    with pytest.raises(ProfileError, match="connection.host '-oProxyCommand=x'"):
        SSH(conn)


@pytest.mark.parametrize("transfer", ["scp", "rsync"])
def test_destination_follows_a_double_dash(monkeypatch, tmp_path, transfer):
    """ssh, scp and rsync all get "--" before their operands, so no operand is read as an option."""
    import shutil

    calls: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    ssh = SSH(SSHConnection(host="gpu-server", user="pi", transfer=transfer))
    ssh.run("true")
    ssh.put([tmp_path], "work")
    ssh.get(["work/out.json"], tmp_path / "back")
    run_cmd = calls[0]
    assert run_cmd[0] == "ssh" and run_cmd[run_cmd.index("--") + 1:] == ["pi@gpu-server", "true"]
    for cmd in calls[1:]:
        operands = cmd[cmd.index("--") + 1:]
        assert any(op.startswith("pi@gpu-server:") for op in operands), cmd
        assert not any(op.startswith("-") for op in operands), cmd
