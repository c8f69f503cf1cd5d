"""Rich progress bars with ETA for every long step; quiet when EDGEKD_QUIET is set."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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

console = Console(stderr=True)


class Bar:
    def __init__(self, progress: Progress | None, task: TaskID | None):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: float) -> None:
        if self._progress is not None and self._task is not None:
            info = "  ".join(f"{k} {v:.4f}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, info=info)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator[Bar]:
    if os.environ.get("EDGEKD_QUIET"):
        yield Bar(None, None)
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
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield Bar(progress, task)
