"""One command at a time on a run folder, and manifest writes that never lose each other's lines.

Two commands on one run folder at once would write the same stage folders and time their latencies
against each other; two processes writing the manifest at once (read, change, write) each lost the
other's change. The second command is refused at once, naming the first; every manifest and
invocations write holds the folder's write lock.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import StageError
from edgekd.runfolder import COMMAND_OWNER, RunFolder
from edgekd.testing import tiny_recipe

HOLD = textwrap.dedent("""
    import sys, time
    from edgekd.runfolder import RunFolder
    with RunFolder(sys.argv[1]).exclusive("stages distill"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(root, seconds=60.0):
    """A second process that holds the run folder (as a running command does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_busy_run_folder_is_refused_before_anything_runs(tmp_path, tiny_teacher_dir, tiny_csv):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv)))
    run = tmp_path / "runs" / "tiny"
    proc = _holder(run)
    try:
        res = CliRunner().invoke(app, ["teacher", str(path)])
    finally:
        proc.kill()
        proc.wait()
    assert res.exit_code != 0
    message = str(res.exception)
    assert isinstance(res.exception, StageError), message
    assert "another edgekd command is running" in message and f"pid {proc.pid}" in message
    assert "stages distill" in message and "--set name=" in message
    assert not (run / "teacher").exists() and not (run / "manifest.json").exists()
    (line,) = [json.loads(x) for x in (run / "invocations.jsonl").read_text().splitlines()]
    assert line["status"] == "error" and "another edgekd command" in line["error"]


def test_the_lock_is_freed_when_its_command_ends_or_dies(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.exclusive("stages eval"):
        assert json.loads((run.root / COMMAND_OWNER).read_text())["command"] == "stages eval"
    assert not (run.root / COMMAND_OWNER).exists()
    with run.exclusive("again"):  # released: the same process takes it again
        pass
    proc = _holder(run.root)
    with pytest.raises(StageError, match="another edgekd command"):
        with run.exclusive("stages eval"):
            pass
    proc.kill()  # a command killed mid-run: the operating system frees its lock
    proc.wait()
    with run.exclusive("after a crash"):
        assert json.loads((run.root / COMMAND_OWNER).read_text())["command"] == "after a crash"


def _write_many(root: str, tag: str, n: int, start) -> None:
    run = RunFolder(root)
    start.wait()  # both processes write at the same moment
    for i in range(n):
        run.update_top(**{f"{tag}{i}": i})
        run.append_invocation({"tag": tag, "i": i})


def test_two_processes_writing_the_manifest_at_once_lose_nothing(tmp_path):
    root = tmp_path / "run"
    RunFolder(root).update_top(name="x")
    ctx = multiprocessing.get_context("spawn")
    n = 150
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(root), tag, n, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    run = RunFolder(root)
    top = run.manifest()
    assert [k for k in (f"{t}{i}" for t in "ab" for i in range(n)) if k not in top] == []
    lines = run.invocations()
    assert sorted((x["tag"], x["i"]) for x in lines) == sorted((t, i) for t in "ab" for i in range(n))
