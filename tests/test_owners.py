"""Leftovers of a killed process are judged by the process, the machine and the boot their names carry."""

import logging
import os
import subprocess
import sys
import time

import pytest

from edgekd import owners


def _other_machine() -> str:
    host = owners.machine_tag()[:8]
    return ("1" if host[0] != "1" else "2") + host[1:]


def test_a_tag_names_the_process_the_machine_and_the_boot_in_characters_names_do_not_split_on():
    tag = owners.process_tag()
    pid, _, where = tag.partition("@")
    assert int(pid) == os.getpid() and len(where) == 16 and set(where) <= set("0123456789abcdef")
    assert "." not in tag and "-" not in tag
    assert not owners.owner_gone(tag, time.time()) and not owners.on_another_machine(tag)


def test_a_process_that_ended_on_this_machine_is_gone_with_or_without_the_machine_in_its_tag(dead_pid):
    assert owners.owner_gone(str(dead_pid), time.time())
    assert owners.owner_gone(f"{dead_pid}@{owners.machine_tag()}", time.time())
    assert not owners.owner_gone("not-a-pid", time.time()) and not owners.owner_gone(f"{dead_pid}@short", time.time())


def test_another_machines_process_is_never_judged_here_even_when_its_pid_is_not_running(dead_pid):
    tag = f"{dead_pid}@{_other_machine()}{owners.machine_tag()[8:]}"
    assert owners.on_another_machine(tag) and not owners.owner_gone(tag, time.time())
    # this process's pid, on the other machine, is not this process either way
    assert not owners.owner_gone(f"{os.getpid()}@{_other_machine()}{owners.machine_tag()[8:]}", time.time())


def test_an_earlier_boot_of_this_machine_has_ended_whatever_runs_under_its_pid_now():
    mine = owners.machine_tag()
    if mine[8:] == owners.UNKNOWN_BOOT:
        pytest.skip("this machine's boot cannot be read (no boot_id, no psutil)")
    earlier = mine[:8] + ("1" if mine[8] != "1" else "2") + mine[9:]
    assert owners.owner_gone(f"{os.getpid()}@{earlier}", time.time())
    assert owners.owner_gone(f"1@{earlier}", time.time())  # pid 1 runs, but it is this boot's


def test_a_pid_reused_by_a_process_started_after_the_leftover_is_not_its_writer(tmp_path):
    pytest.importorskip("psutil")
    leftover = tmp_path / "leftover"
    leftover.write_text("x")
    made = leftover.stat().st_mtime
    time.sleep(owners.CLOCK_SLACK_S + 0.5)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = f"{later.pid}@{owners.machine_tag()}"
        assert owners.pid_running(later.pid)
        assert owners.owner_gone(tag, made)  # running, but started after the leftover was last written
        assert not owners.owner_gone(tag, time.time())  # started before: it may be the writer
    finally:
        later.kill()
        later.wait()


def test_the_export_stage_leaves_another_machines_staged_folders_and_removes_this_ones(dead_pid, tmp_path, caplog):
    from edgekd.export.stage import Staging

    dead, mine = dead_pid, owners.machine_tag()
    other = f"{dead}@{_other_machine()}{mine[8:]}"
    (tmp_path / f".onnx.{dead}@{mine}-abc.staged").mkdir()
    (tmp_path / f".onnx.{other}-def.staged").mkdir()
    (tmp_path / f".executorch.old-{other}").mkdir()
    with caplog.at_level(logging.WARNING):
        Staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".executorch.old-{other}", f".onnx.{other}-def.staged"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert said.count("written by a process on another machine") == 2 and "remove it by hand" in said
    # The staging's own folders carry this process's tag, and a publish leaves nothing of them behind.
    staging = Staging(tmp_path)
    staged = staging.new("onnx")
    assert staged.name.startswith(f".onnx.{owners.process_tag()}-")
    (staged / "model.onnx").write_text("new")
    staging.publish()
    assert (tmp_path / "onnx" / "model.onnx").read_text() == "new"


def test_atomic_dir_clears_what_a_killed_writer_left_for_its_folder_and_nothing_a_live_one_is_writing(dead_pid, tmp_path):
    from edgekd.runfolder import atomic_dir

    dead, mine = dead_pid, owners.machine_tag()
    final = tmp_path / "model"
    (tmp_path / f".model.{dead}@{mine}-abc.tmp").mkdir()  # a write killed before its rename
    (tmp_path / f".model.old-{dead}@{mine}").mkdir()  # a publish killed between its two renames
    (tmp_path / f".model.old-{dead}@{mine}" / "weights").write_text("earlier")
    live = tmp_path / f"{owners.staged_name('model')}xyz.tmp"  # this process's own, still being written
    live.mkdir()
    other = tmp_path / f".model.{dead}@{_other_machine()}{mine[8:]}-def.tmp"  # another machine's
    other.mkdir()
    with atomic_dir(final) as tmp:
        assert tmp.name.startswith(owners.staged_name("model"))
        # the set-aside folder was put back first (nothing had taken its place), the killed write removed
        assert (final / "weights").read_text() == "earlier"
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, live.name, "model"])


def test_a_set_aside_folder_whose_place_was_taken_is_removed_and_a_running_writers_is_kept(dead_pid, tmp_path):
    mine = owners.machine_tag()
    (tmp_path / "onnx").mkdir()
    (tmp_path / f".onnx.old-{dead_pid}@{mine}").mkdir()
    running = tmp_path / f".executorch.old-{os.getppid()}@{mine}"  # its writer runs and is older than it
    running.mkdir()
    assert owners.clear_leftovers(tmp_path, ".staged") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["onnx", running.name])


def test_a_folder_a_running_process_just_set_aside_is_not_taken_for_one_older_than_that_process(tmp_path):
    """A publish renames the earlier folder aside: its modification time is the earlier export's (older than
    the publishing process), and only the rename dates it. It is judged by that, and stays while its writer runs."""
    pytest.importorskip("psutil")
    earlier = tmp_path / "onnx"
    earlier.mkdir()
    hour_ago = time.time() - 3600
    os.utime(earlier, (hour_ago, hour_ago))
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(owners.CLOCK_SLACK_S + 0.5)
        aside = tmp_path / f".onnx.old-{writer.pid}@{owners.machine_tag()}"
        os.replace(earlier, aside)  # as the writer's publish does, between its two renames
        assert aside.stat().st_mtime < hour_ago + 1  # the rename kept the earlier modification time
        assert owners.owner_gone(f"{writer.pid}@{owners.machine_tag()}", aside.stat().st_mtime)  # mtime alone: wrong
        assert not owners.writer_ended(aside, f"{writer.pid}@{owners.machine_tag()}")
        owners.clear_leftovers(tmp_path, ".staged")
        assert [p.name for p in tmp_path.iterdir()] == [aside.name]  # not put back under the writer's feet
    finally:
        writer.kill()
        writer.wait()


def test_a_file_write_clears_the_temporary_file_a_killed_writer_left_and_keeps_a_live_ones(dead_pid, tmp_path):
    from edgekd.runfolder import atomic_write_text

    dead, mine = dead_pid, owners.machine_tag()
    killed = tmp_path / f".manifest.json.{dead}@{mine}-abc.tmp"
    killed.write_text('{"half": ')
    live = tmp_path / f"{owners.staged_name('manifest.json')}xyz.tmp"
    live.write_text("being written")
    earlier = tmp_path / ".manifest.json.q1w2e3r4.tmp"  # named before names carried a tag: not judged
    earlier.write_text("?")
    atomic_write_text(tmp_path / "manifest.json", "{}")
    assert (tmp_path / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([earlier.name, live.name, "manifest.json"])
