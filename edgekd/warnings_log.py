"""Libraries' warnings kept out of the console, in the run folder's ``logs/warnings.log``.

The command line owns its process, so it decides where the libraries' notices go (torch's ONNX
exporter, FutureWarnings, transformers' config messages): into ``RUN/logs/warnings.log``, not
between the progress lines. edgekd's own warnings and log warnings stay on the console.
``EDGEKD_SHOW_WARNINGS=1`` shows every warning on the console as well. Library code never calls
:func:`install`; only ``edgekd.cli.main`` does.

A warning is edgekd's when the code that called ``warnings.warn`` is an ``edgekd`` module (wherever
``stacklevel`` points it); a log record is edgekd's when its logger is ``edgekd`` or below it.
What arrives before the run folder exists (imports, recipe loading) waits in memory and is written
once the folder is there; a command without a run folder drops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.markup import escape

from edgekd.owners import process_tag, writer_ended
from edgekd.progress import console

LOG_FILE = Path("logs") / "warnings.log"
MAX_WAITING = 5000  # lines held before a run folder exists; older ones are dropped beyond this
STDERR_PREFIX = "library-stderr-"  # logs/library-stderr-<pid>@<machine>.txt: library_output's file while a block runs
STDERR_HEADER = "edgekd library_output: "


def is_own(module: str | None) -> bool:
    return module is not None and (module == "edgekd" or module.startswith("edgekd."))


def show_everything() -> bool:
    return os.environ.get("EDGEKD_SHOW_WARNINGS", "") not in ("", "0")


class WarningsLog:
    """Lines for ``RUN/logs/warnings.log``: appended as they come once a run folder is attached."""

    def __init__(self):
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._waiting: list[str] = []
        self.count = 0  # lines added since the last attach

    @property
    def path(self) -> Path | None:
        return None if self._root is None else self._root / LOG_FILE

    def attach(self, run_root: str | Path) -> None:
        """Write to ``run_root/logs/warnings.log`` from now on (once ``run_root`` exists). What a process that
        ended inside :func:`library_output` left there (its raw stderr) is added to the log first."""
        with self._lock:
            self._root, self.count = Path(run_root), len(self._waiting)
        self._fold_orphans()
        self.flush()

    def _fold_orphans(self) -> None:
        """``logs/library-stderr-<pid>@<machine>.txt`` of a process no longer running (``owners.writer_ended``): a
        converter that crashed the process (a C++ abort, a segfault) inside :func:`library_output` wrote its last
        words there, and nothing folded them into the log. They are added now, marked, and said on the console;
        the file goes. Another machine's file (a run folder on a shared disk) is left to that machine."""
        if self._root is None:
            return
        for leftover in sorted((self._root / LOG_FILE.parent).glob(f"{STDERR_PREFIX}*.txt")):
            tag = leftover.stem[len(STDERR_PREFIX):]
            if not writer_ended(leftover, tag):
                continue
            pid = tag.partition("@")[0]
            try:
                first, _, text = leftover.read_bytes().decode("utf-8", "replace").partition("\n")
            except OSError:
                continue
            what = first.removeprefix(STDERR_HEADER)
            lines = _last_states(text)
            for line in lines:
                self.add(f"[{what}, process {pid} ended inside it] {line}")
            with contextlib.suppress(OSError):
                leftover.unlink()
            _say(f"an earlier edgekd process ({pid}) ended while {what} ran, without returning"
                 + (f"; its last words on stderr, now in {self._root / LOG_FILE}: {lines[-1]}" if lines else
                    " and with nothing on stderr"))

    def add(self, text: str) -> None:
        stamp = datetime.now().isoformat(timespec="seconds")
        with self._lock:
            self.count += 1
            self._waiting.append(f"{stamp} {text.rstrip()}\n")
            del self._waiting[:-MAX_WAITING]
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._root is None or not self._root.is_dir() or not self._waiting:
                return
            path = self._root / LOG_FILE
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:  # a log: appended, not swapped atomically
                    f.writelines(self._waiting)
            except OSError as e:  # a read-only run folder: the warnings are shown rather than lost
                self._root = None
                sys.stderr.write(f"edgekd: cannot write {path} ({e}); library warnings follow here\n")
                sys.stderr.writelines(self._waiting)
            self._waiting.clear()


sink = WarningsLog()


def _last_states(text: str) -> list[str]:
    """Each line's last state (not splitlines: a progress bar redraws itself after \\r on one line)."""
    lines = []
    for line in text.split("\n"):
        last = next((part.strip() for part in reversed(line.split("\r")) if part.strip()), "")
        if last:
            lines.append(last)
    return lines


def _caller_module() -> str | None:
    """The module whose code called ``warnings.warn`` (skipping the warnings machinery and this module)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in ("warnings", __name__):
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get("__name__")


def _say(text: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the command: edgekd's on the console, the libraries' in the log."""
    own = is_own(_caller_module())
    if own or show_everything():
        _say(str(message) if own else f"{category.__name__}: {message} ({filename}:{lineno})")
    if not own:
        sink.add(warnings.formatwarning(message, category, filename, lineno, line))


class _ToConsoleOrLog(logging.Handler):
    """The root logger's handler: edgekd's warnings to the console, the libraries' to the log
    (their errors to the console too: those are news, not noise)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if is_own(record.name):
                _say(record.getMessage())
                return
            sink.add(self.format(record))
            if record.levelno >= logging.ERROR or show_everything():
                _say(f"{record.name}: {record.getMessage()}")
        except Exception:
            self.handleError(record)


class _DivertWarnings(logging.Filter):
    """On a library's own console handler: its WARNING records go to the log instead."""

    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if is_own(record.name) or not logging.WARNING <= record.levelno < logging.ERROR or show_everything():
            return True
        sink.add(self.formatter.format(record))
        return False


_divert = _DivertWarnings()
_root_handler = _ToConsoleOrLog()


_installed = False


def route_library_logs() -> None:
    """Put the diversion on every library logger's console handler that exists now (torch and
    transformers add their own when imported: call again after importing them). Does nothing
    unless :func:`install` ran (a library caller keeps its own logging as it is)."""
    if not _installed:
        return
    streams = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or is_own(logger.name):
            continue
        for h in logger.handlers:
            if (isinstance(h, logging.StreamHandler) and id(getattr(h, "stream", None)) in streams
                    and _divert not in h.filters):
                h.addFilter(_divert)


def uninstall() -> None:
    """Give warnings and logging back to Python's defaults (`edgekd serve`: a server's log is its own)."""
    global _installed
    _installed = False
    warnings.showwarning = _original_showwarning
    logging.getLogger().removeHandler(_root_handler)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for h in getattr(logger, "handlers", []):
            h.removeFilter(_divert)


_original_showwarning = warnings.showwarning


@contextlib.contextmanager
def library_output(what: str):
    """What a library writes straight to the process's stderr while the block runs (coremltools' converter
    progress bars, a C++ runtime's notices) goes to the log, not between the progress lines: file descriptor 2,
    and ``sys.stderr`` with it, point at a file, whose lines (a progress bar's last state per line) are then
    added to the log, each marked with ``what``. Once a run folder is attached that file is
    ``logs/library-stderr-<pid>@<machine>.txt``, so a converter that kills the process (an abort, a segfault)
    leaves its last words there, and the next command on the run folder adds them to the log and says so on the console;
    before, a temporary file. Only for a command (:func:`install` ran) and without ``EDGEKD_SHOW_WARNINGS``;
    elsewhere the block runs as it is. The console's own output is on stdout, untouched; an exception still
    propagates (after stderr is back)."""
    if not _installed or show_everything():
        yield
        return
    for stream in (sys.stderr, sys.__stderr__):
        if stream is not None:
            stream.flush()
    named = None
    if sink.path is not None and sink.path.parent.parent.is_dir():
        candidate = sink.path.parent / f"{STDERR_PREFIX}{process_tag()}.txt"
        with contextlib.suppress(OSError):  # (a run folder that cannot be written: a temporary file, as before)
            candidate.parent.mkdir(exist_ok=True)
            candidate.write_bytes(f"{STDERR_HEADER}{what}\n".encode())
            named = candidate
    with open(named, "r+b") if named is not None else tempfile.TemporaryFile() as tmp:  # noqa: SIM115
        tmp.seek(0, os.SEEK_END)
        start = tmp.tell()
        saved, old_stderr = os.dup(2), sys.stderr
        # (sys.stderr too, not only the descriptor: it may not be fd 2's own stream, e.g. under a test runner)
        diverted = open(os.dup(tmp.fileno()), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        try:
            os.dup2(tmp.fileno(), 2)
            sys.stderr = diverted
            yield
        finally:
            sys.stderr = old_stderr
            with contextlib.suppress(Exception):
                diverted.close()
            with contextlib.suppress(Exception):
                sys.__stderr__.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(start)
            text = tmp.read().decode("utf-8", "replace")
            for line in _last_states(text):
                sink.add(f"[{what}] {line}")
            if named is not None:  # folded: the process returned from the block
                with contextlib.suppress(OSError):
                    named.unlink()


def install() -> None:
    """Route warnings and log records as above, for the rest of the process."""
    global _installed
    _installed = True
    warnings.showwarning = showwarning
    root = logging.getLogger()
    if _root_handler not in root.handlers:
        root.addHandler(_root_handler)
    route_library_logs()
