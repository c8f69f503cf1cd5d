"""Benchmarking over SSH: copy the export folders and ``remote_runner.py`` to the device, run the
runner there, bring the JSON results (and evaluation outputs) back.

The system ``ssh``/``scp``/``rsync`` binaries are used, never a Python SSH library, so the user's
ssh configuration, agent and known_hosts apply. BatchMode is always on: a missing key or an
unknown host fails at once with ssh's own message instead of waiting for a password prompt.
The device needs python3 with numpy and the target's runtime; edgekd is not installed there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgekd.devices import measure, remote_runner
from edgekd.devices.profiles import DeviceProfile, ProfileError, SSHConnection, check_ssh_host
from edgekd.errors import StageError
from edgekd.recipe import BenchConfig

SAFE_PATH = re.compile(r"^[A-Za-z0-9._/~-]+$")


class RemoteError(StageError):
    """A device could not be reached, or a command on it failed."""


class SSH:
    """One device reached through the system ssh client, with options taken from the profile."""

    def __init__(self, conn: SSHConnection):
        for tool in ("ssh", "scp") + (("rsync",) if conn.transfer == "rsync" else ()):
            if shutil.which(tool) is None:
                raise RemoteError(f"'{tool}' is not on PATH: install the OpenSSH client (apt-get install openssh-client"
                                  f"{' rsync' if tool == 'rsync' else ''}).")
        try:  # checked at profile load too; again here for connections built in code
            check_ssh_host(conn.host, conn.user)
        except ValueError as e:
            raise ProfileError(f"connection.{e}") from None
        if not SAFE_PATH.match(conn.work_dir):
            raise ProfileError(f"connection.work_dir '{conn.work_dir}' may hold only letters, digits and . _ / ~ -")
        self.conn = conn

    def options(self) -> list[str]:
        c = self.conn
        opts = ["-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={c.strict_host_key_checking}",
                "-o", f"ConnectTimeout={c.connect_timeout_s}", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
        if c.known_hosts_file:
            opts += ["-o", f"UserKnownHostsFile={os.path.expanduser(c.known_hosts_file)}"]
        if c.key_file:
            opts += ["-i", os.path.expanduser(c.key_file), "-o", "IdentitiesOnly=yes"]
        return opts

    def destination(self) -> str:
        return f"{self.conn.user}@{self.conn.host}" if self.conn.user else self.conn.host

    def _remote(self, path: str) -> str:
        host = f"[{self.conn.host}]" if ":" in self.conn.host else self.conn.host
        return f"{self.conn.user + '@' if self.conn.user else ''}{host}:{path}"

    def _call(self, cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{what} on {self.destination()} timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()[-1500:]
            raise RemoteError(f"{what} on {self.destination()} failed (exit {proc.returncode}): {err}")
        return proc

    def run(self, command: str, timeout: float | None = None, what: str = "remote command") -> str:
        # "--": whatever the destination looks like, ssh reads it as the destination, never as an option.
        cmd = ["ssh", *self.options(), "-p", str(self.conn.port), "--", self.destination(), command]
        return self._call(cmd, timeout or self.conn.command_timeout_s, what).stdout

    def put(self, sources: list[Path], remote_dir: str, timeout: float | None = None) -> None:
        srcs = [str(s) for s in sources]
        if self.conn.transfer == "rsync":
            rsh = shlex.join(["ssh", *self.options(), "-p", str(self.conn.port)])
            cmd = ["rsync", "-a", "-e", rsh, "--", *srcs, self._remote(remote_dir.rstrip("/") + "/")]
        else:
            cmd = ["scp", "-q", "-r", *self.options(), "-P", str(self.conn.port), "--", *srcs,
                   self._remote(remote_dir + "/")]
        (self._call if self.conn.transfer == "rsync" else self._call_scp)(
            cmd, timeout or self.conn.command_timeout_s, "copying files")

    def _call_scp(self, cmd: list[str], timeout: float, what: str) -> None:
        try:
            self._call(cmd, timeout, what)
        except RemoteError as e:
            raise RemoteError(f"{e}\n(scp speaks SFTP since OpenSSH 9: the device's sshd needs a 'Subsystem sftp' "
                              "line, or set connection.transfer: rsync in the profile.)") from None

    def get(self, remote_paths: list[str], local_dir: Path, timeout: float | None = None) -> None:
        local_dir.mkdir(parents=True, exist_ok=True)
        if self.conn.transfer == "rsync":
            rsh = shlex.join(["ssh", *self.options(), "-p", str(self.conn.port)])
            cmd = ["rsync", "-a", "-e", rsh, "--", *(self._remote(p) for p in remote_paths), str(local_dir) + "/"]
        else:
            cmd = ["scp", "-q", *self.options(), "-P", str(self.conn.port), "--",
                   *(self._remote(p) for p in remote_paths), str(local_dir) + "/"]
        (self._call if self.conn.transfer == "rsync" else self._call_scp)(
            cmd, timeout or self.conn.command_timeout_s, "fetching results")


def _remote_dir(conn: SSHConnection, run_name: str) -> str:
    base = conn.work_dir[2:] if conn.work_dir.startswith("~/") else conn.work_dir  # ssh starts in $HOME
    safe_run = re.sub(r"[^A-Za-z0-9._-]", "_", run_name)
    return f"{base.rstrip('/')}/{safe_run}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _preflight(ssh: SSH, python: str) -> None:
    probe = f"{shlex.quote(python)} -c 'import numpy, sys; print(sys.version.split()[0], numpy.__version__)'"
    try:
        ssh.run(probe, timeout=ssh.conn.connect_timeout_s + 60, what="checking python and numpy")
    except RemoteError as e:
        raise RemoteError(
            f"{e}\nThe device needs '{python}' with numpy and the artifact's runtime "
            "(pip install numpy onnxruntime); set connection.python in the profile to another interpreter."
        ) from None


def bench_ssh(entries: list[dict[str, Any]], prof: DeviceProfile, cfg: BenchConfig, inputs: measure.Inputs,
              workdir: Path, run_dir: Path) -> dict[str, Any] | None:
    """Measure ``entries`` (artifact entries from ``bench.discover``) on the SSH device of ``prof``;
    fills each entry in place and returns the device's environment record, whose ``threads.requested`` is
    the thread count every job ran with (``bench.threads``, else the profile's, else the device's cores)."""
    conn = prof.connection
    if not isinstance(conn, SSHConnection):
        raise ProfileError(f"profile '{prof.name}' has a '{conn.kind}' connection, not ssh")
    ssh = SSH(conn)
    todo = []
    for e in entries:
        if e.get("status"):
            continue
        if not prof.runs_target(e.get("exporter", e["target"])):
            e.update(status="skipped", reason=f"profile '{prof.name}' does not run target '{e['target']}'")
            continue
        todo.append(e)
    if not todo:
        return None
    case_list = measure.bench_cases(cfg, entries, inputs)  # the same cases as a local bench of these entries
    _preflight(ssh, conn.python)
    rdir = _remote_dir(conn, run_dir.name)
    stage = workdir / "to-device"
    stage.mkdir()
    files = inputs.write(stage)
    shutil.copy(remote_runner.__file__, stage / "remote_runner.py")
    spans = measure.round_spans(cfg.runs, cfg.rounds)
    q = shlex.quote
    ssh.run(f"mkdir -p {q(rdir)}/export", what="creating the work folder")
    try:
        ssh.put(sorted(stage.iterdir()), rdir)
        env = json.loads(ssh.run(f"cd {q(rdir)} && {q(conn.python)} remote_runner.py --env",
                                 what="reading the environment"))
        # The jobs are written once the device has said what it is: a profile without threads or cores is
        # timed on all the device's logical cores, not on this machine's.
        threads = cfg.threads or prof.bench_threads(device_cores=(env.get("cpu") or {}).get("logical_cores"))
        env.setdefault("threads", {})["requested"] = threads
        jobs = workdir / "jobs"
        jobs.mkdir()
        for e in todo:
            job = measure.base_job(cfg, e["name"], threads, prof.onnx_providers, prof.cpus, files, case_list)
            job["folder"] = f"export/{e['name']}"
            for r, (offset, runs) in enumerate(spans):  # one job per round: its slice of the timed calls
                rjob = measure.round_job(job, cfg, r, len(spans), offset, runs)
                (jobs / f"job-{e['name']}-r{r}.json").write_text(json.dumps(rjob, indent=2))
        ssh.put(sorted(jobs.iterdir()), rdir)
        ssh.put([Path(e["folder"]) for e in todo], f"{rdir}/export")
        back = workdir / "from-device"
        pin = " ".join(f"{v}={threads}" for v in remote_runner.THREAD_ENV)
        def measure_one(e: dict[str, Any], r: int, offset: int, runs: int) -> tuple[dict, dict | None]:
            name = e["name"]
            job, res = f"job-{name}-r{r}.json", f"result-{name}-r{r}"
            cmd = (f"cd {q(rdir)} && env {pin} {q(conn.python)} remote_runner.py "
                   f"{q(job)} {q(res + '.json')} 2>&1; echo exit=$?")
            try:
                log = ssh.run(cmd, timeout=min(cfg.timeout_s, conn.command_timeout_s), what=f"benchmarking {name}")
                listing = ssh.run(f"cd {q(rdir)} && ls", what="listing results").split()
                if f"{res}.json" not in listing:
                    tail = "\n".join(log.strip().splitlines()[-15:])
                    raise RemoteError(f"the runner on {ssh.destination()} wrote no result for {name}:\n{tail}")
                wanted = [f"{rdir}/{res}.json"]
                if f"{res}.outputs.npz" in listing:
                    wanted.append(f"{rdir}/{res}.outputs.npz")
                ssh.get(wanted, back)
                return measure.read_result(back / f"{res}.json")
            except (RemoteError, json.JSONDecodeError) as err:
                return {"status": "error", "error": str(err)}, None

        measure.in_rounds(todo, cfg.runs, cfg.rounds, measure_one)
    finally:
        try:
            ssh.run(f"rm -rf {q(rdir)}", timeout=120, what="removing the work folder")
        except RemoteError:
            pass  # the results are already here; a leftover folder on the device is harmless
    env["connection"] = {"kind": "ssh", "host": conn.host, "port": conn.port, "remote_dir": rdir}
    return env
