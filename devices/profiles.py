"""Device profiles: what a device is, what it runs, and how to reach it.

A profile is a YAML file validated by :class:`DeviceProfile` (unknown keys are errors). The
shipped profiles live in ``devices/profiles/``; a user's own profile is any YAML path. The
``local`` profile describes this machine and fills in its processor, cores and ISA features at
load time from ``/proc/cpuinfo`` (or py-cpuinfo where there is no ``/proc``).
"""

from __future__ import annotations

import difflib
import os
import platform
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekd.devices import remote_runner
from edgekd.errors import EdgeKDError
from edgekd.export import registered

# The export targets a profile may name are the exporter registry's (importing it imports no
# backend, so a profile validates where an exporter's dependency is not installed); the runtimes
# are listed here.
TARGETS = tuple(registered())
RUNTIMES = ("onnxruntime", "tensorrt", "executorch", "coreml", "pytorch")
# The runtime each target's folders run on: a profile lists a target only with its runtime. ``pytorch``
# also runs the bench's eager PyTorch rows (teacher and student), measured only where it is listed.
TARGET_RUNTIME = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "executorch": "executorch", "coreml": "coreml",
                  "torchscript-lite": "pytorch"}


class ProfileError(EdgeKDError):
    """A device profile is unknown or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalConnection(_Strict):
    """Benchmark on this machine, each artifact in a fresh child process."""

    kind: Literal["local"] = "local"


# A host name, an IPv4 or IPv6 address (brackets and a %zone allowed) or an ssh_config alias of the same
# characters. Nothing option-shaped (a leading '-': ssh would read "-oProxyCommand=..." as an option), no
# whitespace, no control characters, no '@' (the user is its own key).
SSH_HOST = re.compile(r"^[A-Za-z0-9_.:%\[\]][A-Za-z0-9_.:%\[\]-]*$")
SSH_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


def check_ssh_host(host: str, user: str | None = None) -> None:
    """Raise ValueError unless ``host`` (and ``user``) can only be read by ssh as a destination."""
    if not SSH_HOST.match(host or ""):
        raise ValueError(f"host {host!r} is not a host name or address: use letters, digits and . _ - : % [ ] "
                         "only, not starting with '-' (no spaces, control characters or '@'; the user is 'user')")
    if user is not None and not SSH_USER.match(user):
        raise ValueError(f"user {user!r} is not a login name: use letters, digits and . _ - only, not starting "
                         "with '-'")


class SSHConnection(_Strict):
    """Benchmark on a machine reached with the system ``ssh``/``scp`` (key auth only, no prompts)."""

    kind: Literal["ssh"] = "ssh"
    host: str = Field(description="Host name or address of the device.")
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="Login user (default: ssh's own default).")
    key_file: str | None = Field(None, description="Private key file (passed as ssh -i).")
    python: str = Field("python3", description="Python on the device; needs numpy and the target's runtime.")
    work_dir: str = Field("edgekd-bench", description="Folder on the device (relative paths are under $HOME).")
    strict_host_key_checking: Literal["yes", "accept-new", "no"] = Field(
        "accept-new", description="ssh StrictHostKeyChecking: 'yes' needs the host key already known."
    )
    known_hosts_file: str | None = Field(None, description="UserKnownHostsFile (default: ~/.ssh/known_hosts).")
    connect_timeout_s: int = Field(10, ge=1, description="ssh ConnectTimeout.")
    command_timeout_s: int = Field(1800, ge=1, description="Upper bound of one remote command, in seconds.")
    transfer: Literal["scp", "rsync"] = Field("scp", description="How files are copied (rsync must exist on both ends).")

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        check_ssh_host("localhost", value)
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        check_ssh_host(value)
        return value


class ManualConnection(_Strict):
    """A device benchmarked with its own tool (phones): edgekd writes the exact commands into
    ``bench/<profile>/ON_DEVICE.md`` and imports the result file the tool produces."""

    kind: Literal["manual"] = "manual"
    tool: Literal["adb", "xcode"] = Field(description="adb: ExecuTorch on Android; xcode: Core ML on iPhone.")
    serial: str | None = Field(None, description="adb device serial (adb -s), when several are attached.")


Connection = Annotated[LocalConnection | SSHConnection | ManualConnection, Field(discriminator="kind")]


class DeviceProfile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    processor: str = Field(description="CPU (and SoC) in words; 'auto' on the local profile.")
    arch: str | None = Field(None, description="Machine architecture: x86_64, aarch64, arm64.")
    cores: int | None = Field(None, ge=1, description="Logical CPU cores.")
    memory_gb: float | None = Field(None, gt=0)
    accelerators: list[str] = Field(default_factory=list, description="GPUs, NPUs, DSPs in words.")
    isa: list[str] = Field(default_factory=list, description="ISA features that matter for inference kernels.")
    targets: list[str] = Field(description=f"Export targets it runs: {', '.join(TARGETS)}; each needs its runtime "
                                           "in runtimes.")
    runtimes: list[str] = Field(description=f"Runtimes it has: {', '.join(RUNTIMES)}. A target is run only with its "
                                            "runtime listed (torchscript-lite: pytorch), and the eager PyTorch "
                                            "rows are measured only where pytorch is.")
    onnx_providers: list[str] = Field(
        default_factory=list, description="ONNX Runtime execution providers, in order (empty: runtime default)."
    )
    threads: int | None = Field(None, ge=1, description="Threads to benchmark with (default: cores, else all the "
                                                        "device's logical cores, read on it over ssh).")
    cpus: list[int] | None = Field(None, description="CPU ids the benchmark process is pinned to (Linux).")
    auto_detect: bool = Field(False, description="Fill processor, arch, cores and isa from this machine.")
    connection: Connection = Field(default_factory=LocalConnection)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; known: {', '.join(TARGETS)}")
        return v

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in RUNTIMES]
        if bad:
            raise ValueError(f"unknown runtime(s) {bad}; known: {', '.join(RUNTIMES)}")
        return v

    @model_validator(mode="after")
    def _read_for_its_connection(self) -> DeviceProfile:
        """Keys that only a bench on this machine (auto_detect), of ONNX files (onnx_providers) or one edgekd
        starts itself (cpus) reads."""
        kind = self.connection.kind
        if self.auto_detect and kind != "local":
            raise ValueError(f"auto_detect: fills processor, arch, cores and isa from the machine edgekd runs on, and "
                             f"this profile's device is reached by {kind}: write them in the profile and drop it")
        if self.onnx_providers and "onnx" not in self.targets:
            raise ValueError("onnx_providers: ONNX Runtime's execution providers run the onnx target's folders, and "
                             f"this profile's targets are {', '.join(self.targets)}: drop it, or add onnx to targets")
        missing = [f"{t} runs on {TARGET_RUNTIME[t]}" for t in self.targets
                   if t in TARGET_RUNTIME and TARGET_RUNTIME[t] not in self.runtimes]
        if missing:
            raise ValueError(f"targets: {'; '.join(missing)}, which runtimes ({', '.join(self.runtimes)}) does not "
                             "list: add the runtime the device has, or drop the target it cannot run")
        if self.cpus is not None and kind == "manual":
            raise ValueError("cpus: pins a benchmark process edgekd starts (connection local or ssh), and this "
                             "profile's device is measured by hand (connection manual): drop it")
        return self

    def runs_target(self, target: str) -> bool:
        """Whether the device runs folders of ``target``: listed, with its runtime."""
        runtime = TARGET_RUNTIME.get(target)
        return target in self.targets and (runtime is None or runtime in self.runtimes)

    def runs_pytorch(self) -> bool:
        """Whether the eager PyTorch rows (teacher, student) are measured on this profile."""
        return "pytorch" in self.runtimes

    def bench_threads(self, device_cores: int | None = None) -> int:
        """The threads a bench on this profile times with (unless ``bench.threads`` says): ``threads``, else
        ``cores``, else all the device's logical cores: this machine's for the local profile, ``device_cores``
        (read on the device, as an ssh bench does) for another. A device whose cores are not known here is a
        ProfileError: this machine's count says nothing of it."""
        if self.threads or self.cores:
            return self.threads or self.cores  # type: ignore[return-value]
        if self.connection.kind == "local":
            return os.cpu_count() or 1
        if device_cores:
            return int(device_cores)
        raise ProfileError(
            f"Device profile '{self.name}' sets neither threads nor cores, and its device ({self.connection.kind}) "
            "cannot be asked for its core count here: set threads (or cores) in the profile, or bench.threads."
        )


def _profiles_dir():
    return resources.files("edgekd.devices").joinpath("profiles")


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.name[: -len(".yaml")] for p in _profiles_dir().iterdir() if p.name.endswith(".yaml"))


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {err['msg']}"


def parse_profile(data: object, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"Device profile {source} must be a mapping, got {type(data).__name__}.")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        lines = "\n".join(f"  - {_describe(err)}" for err in e.errors())
        raise ProfileError(f"Invalid device profile {source}:\n{lines}") from None


def load_profile(name_or_path: str | Path, detect: bool = True) -> DeviceProfile:
    """Load a shipped profile by name or a YAML file by path. ``detect=False`` keeps the local
    profile's placeholders (used to validate the file itself)."""
    path = Path(str(name_or_path))
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ProfileError(f"Device profile file {path} does not exist.")
        text, source = path.read_text(), str(path)
    else:
        name = str(name_or_path)
        known = list_profiles()
        if name not in known:
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise ProfileError(
                f"Unknown device profile '{name}'.{hint} Known profiles: {', '.join(known)}; "
                "or pass the path of a profile YAML file."
            )
        text, source = _profiles_dir().joinpath(f"{name}.yaml").read_text(), f"profile '{name}'"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"Device profile {source} is not valid YAML: {e}") from None
    profile = parse_profile(data, source)
    if detect and profile.auto_detect:
        profile = detect_local(profile)
    return profile


def detect_local(base: DeviceProfile) -> DeviceProfile:
    """``base`` with processor, arch, cores, memory and ISA features read from this machine."""
    facts = remote_runner.cpu_facts()
    update = {
        "processor": facts.get("model") or platform.processor() or "unknown",
        "arch": facts.get("arch") or platform.machine(),
        "cores": facts.get("logical_cores") or os.cpu_count(),
        "isa": remote_runner.isa_features(facts.get("flags", [])),
    }
    mem = remote_runner.memory_total_bytes()
    if mem:
        update["memory_gb"] = round(mem / 2**30, 1)
    gpus = remote_runner.gpus()
    if gpus:
        update["accelerators"] = [g["name"] for g in gpus]
    return base.model_copy(update=update)
