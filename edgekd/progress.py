"""Progress for every long step, on a terminal and in a log; quiet when EDGEKD_QUIET is set.

On a terminal: rich bars with ETA. Anywhere else (a CI log, ``| tee``, a file) a bar that redraws
itself would print only when it finishes, so each step prints plain lines instead,
``description: n/total (pct) elapsed 0:01:05, eta 0:02:10, info``: on advance at most every
``EDGEKD_PROGRESS_INTERVAL`` seconds (default 10), and from a heartbeat thread at least every three
intervals while one step is still running (an ONNX export, a long batch), so a log never goes
silent for more than 30 s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgekd.errors import EdgeKDError

T = TypeVar("T")

DEFAULT_INTERVAL_S = 10.0
HEARTBEAT_INTERVALS = 3  # the heartbeat speaks after this many quiet intervals


def _width() -> int | None:
    """A terminal's own width (None: rich follows it); elsewhere COLUMNS, else 120, not rich's 80."""
    try:
        if sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    cols = os.environ.get("COLUMNS", "")
    return int(cols) if cols.isdigit() and int(cols) > 0 else 120


# Everything a command reports (progress, stage lines, summary, tables) goes to stdout: it is the
# command's output, so `edgekd run > run.log` or `edgekd run | tee run.log` keeps all of it, in
# order. Errors (and Python's tracebacks) stay on stderr, visible even when stdout is redirected.
console = Console(width=_width())
error_console = Console(stderr=True, width=_width())


def interval_s() -> float:
    """Seconds between plain progress lines on advance (EDGEKD_PROGRESS_INTERVAL, default 10)."""
    raw = os.environ.get("EDGEKD_PROGRESS_INTERVAL")
    if raw is None or raw == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise EdgeKDError(f"EDGEKD_PROGRESS_INTERVAL={raw!r} is not a number of seconds above 0: unset it "
                          f"(default {DEFAULT_INTERVAL_S:g}) or set e.g. EDGEKD_PROGRESS_INTERVAL=10.")
    return value


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _info(note: str, fields: dict[str, float | str]) -> str:
    parts = [note] if note else []
    parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
    return "  ".join(parts)


class _PlainStep:
    """One step's counts and clock, written out as plain lines."""

    def __init__(self, description: str, total: int | None, completed: int = 0):
        self.description, self.total, self.completed = description, total, completed
        self.start = self.last_line = time.monotonic()
        self.first = completed
        self.info = ""

    def line(self, done: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        if self.total is None:  # an activity without counts: only its clock
            return f"{self.description}: running, elapsed {_clock(elapsed)}"
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        head = f"{self.description}: {self.completed}/{self.total}{pct}"
        if done:
            text = f"{head} done in {_clock(elapsed)}"
        else:
            rate = (self.completed - self.first) / elapsed if elapsed > 0 else 0.0
            eta = _clock((self.total - self.completed) / rate) if rate > 0 and self.total else "?"
            text = f"{head} elapsed {_clock(elapsed)}, eta {eta}"
        return f"{text}, {self.info}" if self.info else text


class _Plain:
    """The open plain steps (innermost last) and the heartbeat thread that speaks for the innermost."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps: list[_PlainStep] = []
        self.stop: threading.Event | None = None

    def say(self, step: _PlainStep, done: bool = False) -> None:
        step.last_line = time.monotonic()
        console.print(step.line(done), markup=False, highlight=False, soft_wrap=True)

    def open(self, step: _PlainStep, every: float) -> None:
        with self.lock:
            self.steps.append(step)
            if self.stop is None:
                self.stop = threading.Event()
                threading.Thread(target=self._beat, args=(self.stop, every * HEARTBEAT_INTERVALS),
                                 name="edgekd-progress",
                                 daemon=True).start()

    def close(self, step: _PlainStep) -> None:
        with self.lock:
            self.steps.remove(step)
            if step.total is not None:
                self.say(step, done=True)
            if not self.steps and self.stop is not None:
                self.stop.set()
                self.stop = None

    def advance(self, step: _PlainStep, every: float) -> None:
        with self.lock:
            if time.monotonic() - step.last_line >= every and step.completed < (step.total or 0):
                self.say(step)

    def _beat(self, stop: threading.Event, every: float) -> None:
        while not stop.wait(min(every / 4, 1.0)):
            with self.lock:
                if stop.is_set() or not self.steps:
                    return
                step = self.steps[-1]
                # an outer step is quiet while an inner one runs: the inner one's line says more
                if time.monotonic() - max(s.last_line for s in self.steps) >= every:
                    self.say(step)


_plain = _Plain()
_live: Progress | None = None  # the terminal's one live display; nested steps add their rows to it


class Bar:
    """What a step reports: ``advance`` after each unit of work, ``note`` to name the one starting."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None,
                 plain: _PlainStep | None = None, every: float = DEFAULT_INTERVAL_S):
        self._progress, self._task, self._plain, self._every = progress, task, plain, every
        self._note, self._fields = "", {}

    def note(self, text: str) -> None:
        """Name the unit of work now running (an export target, a candidate): shown until the next note."""
        self._note = text
        self._show(0)

    def advance(self, n: int = 1, **fields: float | str) -> None:
        self._fields = fields
        self._show(n)

    def _show(self, n: int) -> None:
        info = _info(self._note, self._fields)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, info=info)
        elif self._plain is not None:
            self._plain.completed += n
            self._plain.info = info
            if n:
                _plain.advance(self._plain, self._every)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator[Bar]:
    """Progress of one step of ``total`` units (``completed`` already done, when resuming)."""
    if os.environ.get("EDGEKD_QUIET"):
        yield Bar()
        return
    if not (console.is_terminal or console.is_jupyter):
        every = interval_s()
        step = _PlainStep(description, total, completed)
        _plain.open(step, every)
        try:
            yield Bar(plain=step, every=every)
        finally:
            _plain.close(step)
        return
    global _live
    if _live is not None:  # inside another step: one more row of the same display
        task = _live.add_task(description, total=total, completed=completed, info="")
        yield Bar(_live, task)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        _live = progress
        try:
            task = progress.add_task(description, total=total, completed=completed, info="")
            yield Bar(progress, task)
        finally:
            _live = None


def track(items: Sequence[T], description: str, label: Callable[[T], str] | None = None) -> Iterator[T]:
    """``items`` one by one inside a progress step, each named by ``label(item)`` while it runs
    (like ``rich.progress.track``, in both the terminal and the plain form)."""
    with progress_bar(description, total=len(items)) as bar:
        for item in items:
            if label is not None:
                bar.note(label(item))
            yield item
            bar.advance()


@contextlib.contextmanager
def activity(description: str) -> Iterator[None]:
    """A long piece of work without counts (a whole stage): in plain output the heartbeat names it
    while no step inside it is reporting; on a terminal it shows nothing of its own."""
    if os.environ.get("EDGEKD_QUIET") or console.is_terminal or console.is_jupyter:
        yield
        return
    step = _PlainStep(description, None)
    _plain.open(step, interval_s())
    try:
        yield
    finally:
        _plain.close(step)
