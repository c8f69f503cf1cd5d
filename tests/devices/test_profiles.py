"""Device profiles: every shipped YAML loads, unknown keys are errors, the local one is detected."""

from __future__ import annotations

import os
import sys
from importlib import resources

import pytest
import yaml

from edgekd.devices.profiles import (
    RUNTIMES,
    TARGETS,
    DeviceProfile,
    ProfileError,
    list_profiles,
    load_profile,
)

SHIPPED = (
    "local", "raspberry-pi-5", "jetson-orin-nano", "x86-edge-box", "nvidia-datacenter-gpu",
    "iphone-coreml", "android-executorch",
)


def test_every_shipped_profile_is_listed():
    files = sorted(p.name for p in resources.files("edgekd.devices").joinpath("profiles").iterdir()
                   if p.name.endswith(".yaml"))
    assert list_profiles() == sorted(f[:-5] for f in files)
    assert set(SHIPPED) <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_validates(name):
    prof = load_profile(name, detect=False)
    assert prof.name == name  # the file name and the profile's name agree
    assert prof.targets and set(prof.targets) <= set(TARGETS)
    assert prof.runtimes and set(prof.runtimes) <= set(RUNTIMES)
    if prof.connection.kind == "ssh":
        assert prof.connection.host and prof.connection.python
    assert prof.description and prof.processor


def test_phone_profiles_use_their_own_tools():
    assert load_profile("iphone-coreml").connection.tool == "xcode"
    assert load_profile("iphone-coreml").targets == ["coreml"]
    assert load_profile("android-executorch").connection.tool == "adb"
    assert load_profile("jetson-orin-nano").onnx_providers[0] == "TensorrtExecutionProvider"


def test_unknown_key_is_an_error(tmp_path):
    data = yaml.safe_load((resources.files("edgekd.devices") / "profiles" / "raspberry-pi-5.yaml").read_text())
    data["cpu_speed"] = "fast"
    data["connection"]["passwrd"] = "x"
    path = tmp_path / "pi.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert "cpu_speed: unknown key" in str(e.value)
    assert "passwrd: unknown key" in str(e.value)  # every problem at once


def test_bad_values_are_named(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "description": "d", "processor": "p", "targets": ["tflite"],
                                    "runtimes": ["onnxruntime"], "connection": {"kind": "ssh", "port": 70000}}))
    msg = str(pytest.raises(ProfileError, load_profile, path).value)
    assert "unknown target(s) ['tflite']" in msg and "host" in msg and "port" in msg


def test_unknown_name_lists_known_profiles():
    with pytest.raises(ProfileError) as e:
        load_profile("raspberry-pi5")
    msg = str(e.value)
    assert "Did you mean 'raspberry-pi-5'" in msg
    for name in SHIPPED:
        assert name in msg
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/nonexistent/device.yaml")


def test_local_profile_is_detected():
    raw = load_profile("local", detect=False)
    assert raw.processor == "auto" and raw.auto_detect
    prof = load_profile("local")
    assert prof.processor != "auto" and prof.cores == os.cpu_count()
    assert prof.arch
    if sys.platform.startswith("linux"):
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features"))).split(":")[1].split()
        for feature in ("avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "avx2", "asimddp"):
            assert (feature in prof.isa) == (feature in flags)
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
        if model:
            assert prof.processor == model
    assert prof.bench_threads() == os.cpu_count()


def test_model_round_trips():
    prof = load_profile("raspberry-pi-5")
    assert DeviceProfile.model_validate(prof.model_dump(mode="json")) == prof


def test_keys_that_the_profiles_connection_never_reads_are_refused(tmp_path):
    """auto_detect describes the machine edgekd runs on, so a remote device would take this one's cores
    and ISA (and the quantize stage its weight encoding); onnx_providers load ONNX files only; cpus pins a
    process edgekd starts, which a device measured by hand is not."""
    pi = yaml.safe_load((resources.files("edgekd.devices") / "profiles" / "raspberry-pi-5.yaml").read_text())
    phone = yaml.safe_load((resources.files("edgekd.devices") / "profiles" / "android-executorch.yaml").read_text())
    for data, key, message in (
            ({**pi, "auto_detect": True}, "auto_detect", "auto_detect: fills processor, arch, cores and isa from the "
             "machine edgekd runs on, and this profile's device is reached by ssh: write them in the profile and "
             "drop it"),
            ({**phone, "auto_detect": True}, "auto_detect", "is reached by manual"),
            ({**phone, "onnx_providers": ["XnnpackExecutionProvider"]}, "providers", "onnx_providers: ONNX "
             "Runtime's execution providers run the onnx target's folders, and this profile's targets are executorch: "
             "drop it, or add onnx to targets"),
            ({**phone, "cpus": [0, 1]}, "cpus", "cpus: pins a benchmark process edgekd starts (connection local or "
             "ssh), and this profile's device is measured by hand (connection manual): drop it")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ProfileError) as e:
            load_profile(path)
        assert message in str(e.value)
    # where they are read: the local machine detects itself; an ssh device's bench process is pinned
    assert load_profile("local", detect=False).auto_detect
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump({**pi, "cpus": [0, 1]}))
    assert load_profile(path).cpus == [0, 1]
