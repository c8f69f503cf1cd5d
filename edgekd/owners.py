"""Who left a file or folder behind, and whether it is gone.

A process that may be killed mid-write names what it leaves with its ``process_tag()``: its pid, and the
machine and boot it runs on. The next process to find the leftover removes or recovers it only when
``owner_gone`` says its writer has ended. A pid alone would say the wrong thing in three cases, each of which
would remove a folder still being written or keep an orphan forever:

- a run folder on a disk that two machines share: a pid of the other machine is not running here, whatever
  it is doing there (the leftover is kept, and the caller says so);
- a reboot: every pid of the earlier boot has ended, whatever runs under that number now;
- a pid reused by a later process: a process started after the leftover was made did not make it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil
import socket
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

UNKNOWN_BOOT = "0" * 8
CLOCK_SLACK_S = 2.0  # a process start (boot time, whole seconds, + ticks) against a file time: clocks apart by up to a second


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@cache
def machine_tag() -> str:
    """This machine and boot as 16 hex digits: 8 of the host name's sha256, 8 of the boot's (Linux's boot_id,
    else the boot time psutil reports, else unknown: zeros). No dots or dashes, which the leftovers' names
    split on."""
    boot = UNKNOWN_BOOT
    try:
        boot = _digest(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        try:
            import psutil

            boot = _digest(f"{psutil.boot_time():.0f}")
        except Exception:  # noqa: BLE001 - psutil missing or unable: the boot is unknown, the pid still judged
            pass
    return _digest(socket.gethostname()) + boot


def process_tag() -> str:
    """This process as the names of its leftovers carry it: ``<pid>@<machine_tag()>``."""
    return f"{os.getpid()}@{machine_tag()}"


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); None where that cannot be read here."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, ended meanwhile, or another user's process: not known here
        return None


def owner_gone(tag: str, made_at: float) -> bool:
    """Whether the process that ``tag`` names (``process_tag()``, or a bare pid: names before they carried the
    machine) has ended, so that what it left, last changed at ``made_at`` (a file time), is nobody's.

    False for this process; for a process of another machine (its pid says nothing here); for a tag that is
    not one. True for a process of an earlier boot of this machine, for a pid that is not running, and for a
    pid now running a process started after the leftover was last changed (a reused number)."""
    pid, _, where = tag.partition("@")
    if not pid.isdigit() or (where and len(where) != 16) or on_another_machine(tag):
        return False
    mine = machine_tag()
    if where and UNKNOWN_BOOT not in (where[8:], mine[8:]) and where[8:] != mine[8:]:
        return True  # an earlier boot of this machine
    if int(pid) == os.getpid() and (not where or where == mine):
        return False
    if not pid_running(int(pid)):
        return True
    started = _started(int(pid))
    return started is not None and started > made_at + CLOCK_SLACK_S


def writer_ended(path: Path, tag: str) -> bool:
    """``owner_gone`` for what ``tag``'s process left at ``path``, as of its last change: the later of its
    modification and its inode's change (a rename changes the latter only, so a folder set aside a moment ago
    by a running process is not taken for one older than that process). False where ``path`` is gone."""
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return owner_gone(tag, max(st.st_mtime, st.st_ctime))


def on_another_machine(tag: str) -> bool:
    """Whether ``tag`` names a process of another machine than this one (a run folder on a shared disk)."""
    where = tag.partition("@")[2]
    return len(where) == 16 and where[:8] != machine_tag()[:8]


def staged_name(name: str) -> str:
    """The prefix of a folder or file staged for ``name`` by this process (``tempfile.mkdtemp`` or ``mkstemp``'s
    ``prefix``), which ``clear_leftovers`` reads back: ``.<name>.<pid>@<machine>-``."""
    return f".{name}.{process_tag()}-"


def set_aside_name(name: str) -> str:
    """Where a publish sets the earlier ``name`` aside while the staged one takes its place."""
    return f".{name}.old-{process_tag()}"


def clear_leftovers(root: Path, suffix: str, name: str = "*") -> list[str]:
    """What processes that ended left in ``root`` for ``name`` (every name by default), written under
    ``staged_name`` (ending in ``suffix``) and ``set_aside_name``: a staged folder is removed (nothing
    published it); an earlier folder set aside by a publish killed before the staged one took its place is
    put back where nothing took its place, else removed. Leftovers of running processes are left alone, and
    so are another machine's, whose paths are returned for the caller to say (their pids mean nothing here).
    A name that is not a tag (written before names carried one) is left alone too."""
    root, elsewhere = Path(root), []
    if not root.is_dir():
        return elsewhere

    def ended(path: Path, tag: str) -> bool:
        if on_another_machine(tag):
            elsewhere.append(str(path))
            return False
        return writer_ended(path, tag)

    pattern = name if name == "*" else glob.escape(name)
    for path in root.glob(f".{pattern}.*{suffix}"):
        stem = path.name[: -len(suffix)] if suffix else path.name
        tag = stem.rsplit(".", 1)[-1].split("-", 1)[0] if stem.count(".") >= 2 else ""
        if ".old-" not in path.name and ended(path, tag):
            log.info("removing %s: staged by a process that did not finish", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:  # a file written in place of another (atomic_write_bytes)
                with contextlib.suppress(OSError):
                    path.unlink()
    for path in root.glob(f".{pattern}.old-*"):
        final_name, _, tag = path.name[1:].rpartition(".old-")
        if not final_name or not ended(path, tag):
            continue
        if not (root / final_name).exists():
            log.warning("putting back %s as %s: a publish was killed between its two renames", path, final_name)
            os.replace(path, root / final_name)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return elsewhere
