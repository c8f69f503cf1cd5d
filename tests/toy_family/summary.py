"""The toy family's part of the console summary: the trained model's validation accuracy."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from edgekd.report import FamilySummary, pct
from edgekd.runfolder import RunFolder


def table(run: RunFolder) -> Table | None:
    met = ((run.manifest().get("stages") or {}).get("distill") or {}).get("metrics")
    if not met:
        return None
    t = Table(title="rows: validation split")
    t.add_column("model")
    t.add_column("params", justify="right")
    t.add_column("accuracy %", justify="right")
    t.add_row("linear", str(met["params"]), pct(met["validation"]["accuracy"]))
    return t


def lines(summary: dict[str, Any]) -> list[str]:
    return []


SUMMARY = FamilySummary(primary_metric="accuracy", eval_columns=(("accuracy", "accuracy %"),),
                        table=table, lines=lines)
