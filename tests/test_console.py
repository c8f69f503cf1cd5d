"""What the console says: plain progress lines in logs, libraries' warnings kept in the run folder,
`--version`, `edgekd devices`, and a summary of every stage built from the manifest."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
import warnings

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgekd import __version__, progress, warnings_log
from edgekd.cli import app

LINE = re.compile(r"^fake step: (\d+)/3 \((\d+)%\) (elapsed \d+:\d\d:\d\d, eta (\S+)|done in \d+:\d\d:\d\d)"
                  r"(, .*)?$")


class _Stamped(io.StringIO):
    """A non-terminal stream that remembers when each line arrived."""

    def __init__(self):
        super().__init__()
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            now = time.monotonic()
            self.lines += [(now, part) for part in s.splitlines() if part.strip()]
        return len(s)


@pytest.fixture
def plain(monkeypatch):
    """Progress written to a non-terminal stream with a 0.2 s interval (heartbeat after 0.6 s)."""
    out = _Stamped()
    monkeypatch.setattr(progress, "console", Console(file=out, width=120))
    monkeypatch.delenv("EDGEKD_QUIET", raising=False)
    monkeypatch.setenv("EDGEKD_PROGRESS_INTERVAL", "0.2")
    return out


def test_a_slow_step_prints_plain_lines_and_a_heartbeat_while_one_unit_takes_long(plain):
    start = time.monotonic()
    with progress.progress_bar("fake step", total=3) as bar:
        for _ in range(200):  # many quick advances of nothing: throttled, not 200 lines
            bar.advance(0)
        bar.advance(1, loss=0.5)
        bar.note("the long one")
        time.sleep(2.0)  # one unit of work far longer than the heartbeat
        bar.advance(1)
        bar.advance(1)
    end = time.monotonic()
    lines = plain.lines
    assert all(LINE.match(text) for _, text in lines), [t for _, t in lines]
    assert lines[-1][1].startswith("fake step: 3/3 (100%) done in 0:00:0")
    during = [text for t, text in lines if text.startswith("fake step: 1/3")]
    assert len(during) >= 2 and "the long one" in during[-1] and "loss 0.5000" in during[-1]
    assert re.search(r"eta 0:00:0\d", during[-1])  # one unit done in about 0 s: an estimate, not '?'
    stamps = [start] + [t for t, _ in lines] + [end]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 0.6 + 0.5, gaps  # the heartbeat (3 intervals) plus scheduling slack


def test_advances_print_at_most_once_per_interval(plain):
    with progress.progress_bar("fake step", total=3) as bar:
        bar.advance(1)
        time.sleep(0.25)
        bar.advance(1)  # 0.25 s after the start: a line
        bar.advance(0)  # right after: none
        bar.advance(1)
    texts = [t for _, t in plain.lines]
    assert texts == [texts[0], texts[-1]] and texts[0].startswith("fake step: 2/3 (67%) elapsed")


def test_a_stage_without_counts_is_named_by_the_heartbeat(plain):
    with progress.activity("prune"):
        time.sleep(0.9)
    texts = [t for _, t in plain.lines]
    assert texts and all(re.fullmatch(r"prune: running, elapsed 0:00:00", t) for t in texts), texts


def test_quiet_and_a_bad_interval(plain, monkeypatch):
    monkeypatch.setenv("EDGEKD_QUIET", "1")
    with progress.progress_bar("fake step", total=3) as bar:
        bar.advance(3)
    assert plain.lines == []
    monkeypatch.delenv("EDGEKD_QUIET")
    monkeypatch.setenv("EDGEKD_PROGRESS_INTERVAL", "soon")
    with pytest.raises(progress.EdgeKDError, match="EDGEKD_PROGRESS_INTERVAL='soon'"):
        with progress.progress_bar("fake step", total=3):
            pass


def test_nested_steps_on_a_terminal_share_one_display(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=True, width=100))
    monkeypatch.delenv("EDGEKD_QUIET", raising=False)
    with progress.progress_bar("outer", total=2) as outer:
        for _ in progress.track([1, 2], "inner", label=str):
            outer.advance()
    assert "outer" in out.getvalue() and "inner" in out.getvalue()


# --- libraries' warnings: in RUN/logs/warnings.log, not on the console ------------------------------------


def _warn_from(module: str, message: str, category=FutureWarning) -> None:
    """Call warnings.warn from code whose module is ``module`` (a stand-in library or edgekd itself)."""
    exec("import warnings\nwarnings.warn(MESSAGE, CATEGORY, stacklevel=2)",
         {"__name__": module, "MESSAGE": message, "CATEGORY": category})


@pytest.fixture
def routed(monkeypatch, tmp_path):
    """The command's routing, on a fresh log and a captured console, undone afterwards."""
    sink, out = warnings_log.WarningsLog(), io.StringIO()
    monkeypatch.setattr(warnings_log, "sink", sink)
    monkeypatch.setattr(warnings_log, "console", Console(file=out, width=200))
    monkeypatch.setattr(warnings_log, "_installed", True)
    monkeypatch.delenv("EDGEKD_SHOW_WARNINGS", raising=False)
    root = logging.getLogger()
    root.addHandler(warnings_log._root_handler)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warnings_log.showwarning
        yield sink, out, tmp_path / "runs" / "r"
    root.removeHandler(warnings_log._root_handler)


def test_library_warnings_go_to_the_run_log_and_edgekd_ones_to_the_console(routed, capsys):
    sink, out, run = routed
    _warn_from("fakelib.image", "Failed to load image Python extension")  # before the run folder exists
    sink.attach(run)
    _warn_from("fakelib.image", "torch.tensor results are registered as constants")
    _warn_from("edgekd.recipe", "quantize.torch_method was removed", UserWarning)
    logging.getLogger("fakelib.onnx").warning("torchvision is not installed. Skipping torchvision::nms")
    logging.getLogger("edgekd.export").warning("export target 'coreml' skipped: no coremltools")
    assert not (run / "logs").exists()  # nothing creates the run folder before the run does
    run.mkdir(parents=True)
    sink.flush()
    log = (run / "logs" / "warnings.log").read_text()
    for text in ("Failed to load image", "registered as constants", "FutureWarning", "fakelib.onnx: torchvision"):
        assert text in log
    assert "quantize.torch_method" not in log and "coreml" not in log
    shown = out.getvalue()
    assert "warning: quantize.torch_method was removed" in shown
    assert "warning: export target 'coreml' skipped" in shown
    assert "Failed to load" not in shown and "torchvision" not in shown and "constants" not in shown
    assert "Failed to load" not in capsys.readouterr().err
    assert sink.count == 3


def test_a_library_logger_with_its_own_handler_is_diverted(routed, capsys):
    sink, out, run = routed
    run.mkdir(parents=True)
    sink.attach(run)
    lib = logging.getLogger("fakelib2")
    handler = logging.StreamHandler(sys.stderr)
    lib.addHandler(handler)
    lib.propagate = False
    try:
        warnings_log.route_library_logs()
        lib.warning("loss_type=None was set in the config")
        lib.error("a real failure")
    finally:
        lib.removeHandler(handler)
        lib.propagate = True
    err = capsys.readouterr().err
    assert "loss_type" not in err and "a real failure" in err  # errors are news, warnings are noise
    assert "loss_type=None" in (run / "logs" / "warnings.log").read_text()


def test_edgekd_show_warnings_shows_the_libraries_too(routed, monkeypatch):
    sink, out, run = routed
    monkeypatch.setenv("EDGEKD_SHOW_WARNINGS", "1")
    _warn_from("fakelib", "a deprecation")
    assert "FutureWarning: a deprecation" in out.getvalue()


# --- commands --------------------------------------------------------------------------------------------


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"edgekd {__version__}"


def test_devices_lists_every_shipped_profile_and_the_reference_points_to_it():
    from edgekd.devices.profiles import list_profiles
    from edgekd.recipe import reference_markdown

    res = CliRunner().invoke(app, ["devices"])
    assert res.exit_code == 0, res.output
    for name in list_profiles():
        assert name in res.output
    assert "this machine" in res.output and "ssh" in res.output and "adb" in res.output
    assert "`edgekd devices`" in reference_markdown()


def test_an_unwritable_log_shows_the_warnings_instead(tmp_path, capsys):
    sink = warnings_log.WarningsLog()
    (tmp_path / "logs").write_text("a file where the logs folder goes")
    sink.attach(tmp_path)
    sink.add("FutureWarning: something deprecated")
    err = capsys.readouterr().err
    assert "cannot write" in err and "something deprecated" in err


def test_serve_gives_warnings_back_to_python():
    root = logging.getLogger()
    with warnings.catch_warnings():
        warnings_log.install()
        assert warnings.showwarning is warnings_log.showwarning and warnings_log._root_handler in root.handlers
        warnings_log.uninstall()
        assert warnings.showwarning is warnings_log._original_showwarning
        assert warnings_log._root_handler not in root.handlers and not warnings_log._installed


@pytest.mark.slow
def test_a_command_whose_output_is_not_a_terminal_speaks_at_least_every_heartbeat(tmp_path, tiny_teacher_dir,
                                                                                   tiny_csv, monkeypatch):
    """`edgekd teacher` with stdout a pipe: from its first line to its last, no silence longer than the
    heartbeat (3 × 0.5 s here, 30 s by default), and no library warning on either stream."""
    import os
    import subprocess

    import yaml

    from edgekd.testing import tiny_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                                               teacher={"finetune": {"epochs": 2, "batch_size": 32}})))
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKD_QUIET", "EDGEKD_SHOW_WARNINGS")}
    env["EDGEKD_PROGRESS_INTERVAL"] = "0.5"
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "teacher", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    texts = [t for _, t in lines]
    assert any(re.match(r"teacher fine-tune: \d+/\d+ \(\d+%\) (elapsed|done in)", t) for t in texts), texts
    assert any(t.startswith("│ teacher ") for t in texts)  # the summary names the stage
    gaps = [b[0] - a[0] for a, b in zip(lines, lines[1:], strict=False)]
    assert max(gaps) < 1.5 + 1.5, list(zip(gaps, texts[1:], strict=True))
    for noise in ("Warning:", "FutureWarning", "UserWarning", "torchvision"):
        assert noise not in err and not any(noise in t for t in texts), noise


def test_a_librarys_own_stderr_goes_to_the_log_not_the_console(monkeypatch, capfd):
    """coremltools' converter progress bars and a C++ runtime's notices are written straight to stderr; inside
    ``library_output`` a command keeps them out of the console (in the log, a bar's last state per line),
    and stdout, the console's own, is untouched. Without install() they pass through."""
    import os
    import sys

    sink = warnings_log.WarningsLog()
    monkeypatch.setattr(warnings_log, "sink", sink)
    monkeypatch.setattr(warnings_log, "_installed", True)
    monkeypatch.delenv("EDGEKD_SHOW_WARNINGS", raising=False)
    with warnings_log.library_output("coreml"):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        sys.stderr.write("Converting: 0%|\rConverting: 50%|\rConverting: 100%| 336/336\n")
        print("export: 1/1 (100%) done")
    out, err = capfd.readouterr()
    assert err == "" and "export: 1/1 (100%) done" in out
    assert [line.split(" ", 1)[1].rstrip("\n") for line in sink._waiting] == [
        "[coreml] [cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version",
        "[coreml] Converting: 100%| 336/336"]
    with pytest.raises(RuntimeError, match="boom"), warnings_log.library_output("coreml"):
        raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # stderr is back after an exception too

    monkeypatch.setattr(warnings_log, "_installed", False)
    with warnings_log.library_output("coreml"):
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"


def test_a_process_killed_inside_library_output_leaves_its_stderr_to_the_next_command(tmp_path):
    """A converter that aborts the process inside ``library_output`` took its last stderr lines with it (they
    were in an unlinked temporary file). With a run folder they are in logs/library-stderr-<pid>@<machine>.txt, and the
    next command on the folder adds them to the log, marked, and says so; a block that returns leaves no file."""
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    (run / "logs").mkdir()
    (run / "logs" / "library-stderr-1.txt").write_text("edgekd library_output: a live process's block\nbusy\n")
    start = ("import os\nfrom edgekd import warnings_log\nwarnings_log.install()\n"
             f"warnings_log.sink.attach({str(run)!r})\n")
    crash = start + ('with warnings_log.library_output("export onnx"):\n    os.write(2, b"fine\\n")\n'
                     'with warnings_log.library_output("export coreml"):\n'
                     '    os.write(2, b"Converting: 10%\\rConverting: 20%\\nlibc++abi: terminating\\n")\n'
                     '    os._exit(134)\n')
    res = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert res.returncode == 134 and "terminating" not in res.stderr + res.stdout, res.stderr
    left = sorted(p.name for p in (run / "logs").glob("library-stderr-*.txt"))
    assert len(left) == 2 and left[0] == "library-stderr-1.txt" and _pid_of(left) > 1
    log = (run / "logs" / "warnings.log").read_text()
    assert "[export onnx] fine" in log and "terminating" not in log

    res = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pid = _pid_of(left)
    said = " ".join(res.stdout.split())
    assert (f"an earlier edgekd process ({pid}) ended while export coreml ran, without returning; its last words "
            f"on stderr, now in {run / 'logs' / 'warnings.log'}: libc++abi: terminating") in said, res.stdout
    log = (run / "logs" / "warnings.log").read_text()
    assert f"[export coreml, process {pid} ended inside it] Converting: 20%" in log
    assert f"[export coreml, process {pid} ended inside it] libc++abi: terminating" in log
    # the live process's file is its own still; the dead one's is gone
    assert sorted(p.name for p in (run / "logs").glob("library-stderr-*.txt")) == ["library-stderr-1.txt"]


def _pid_of(names: list[str]) -> int:
    from edgekd.owners import machine_tag

    tag = next(n[len("library-stderr-"):-4] for n in names if n != "library-stderr-1.txt")
    pid, _, where = tag.partition("@")
    assert where == machine_tag(), tag  # named with the machine as well as the pid
    return int(pid)


def test_library_output_where_its_file_cannot_be_written_still_diverts(monkeypatch, capfd, tmp_path):
    """logs/library-stderr-<pid>@<machine>.txt cannot be written (here a folder holds its name): the block's stderr goes to
    a temporary file as before (it opened the file it had failed to write, and raised), and reaches the log."""
    import os

    run = tmp_path / "run"
    from edgekd.owners import process_tag

    (run / "logs" / f"library-stderr-{process_tag()}.txt").mkdir(parents=True)
    sink = warnings_log.WarningsLog()
    sink.attach(run)
    monkeypatch.setattr(warnings_log, "sink", sink)
    monkeypatch.setattr(warnings_log, "_installed", True)
    monkeypatch.delenv("EDGEKD_SHOW_WARNINGS", raising=False)
    with warnings_log.library_output("coreml"):
        os.write(2, b"converting\n")
    assert capfd.readouterr().err == ""
    assert "[coreml] converting" in (run / "logs" / "warnings.log").read_text()
