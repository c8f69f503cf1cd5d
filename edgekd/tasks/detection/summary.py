"""What object detection adds to a run's summary (``edgekd.report``): the eval table of teacher and
students by mAP, and how much of the teacher's mAP the student keeps."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from edgekd.report import FamilySummary, eval_rows, pct
from edgekd.runfolder import RunFolder


def eval_table(run: RunFolder) -> Table | None:
    found = eval_rows(run, "student (no teacher)")
    if found is None:
        return None
    ev, rows = found
    table = Table(title=f"edgekd run '{run.root.name}': test split ({ev['summary']['test_images']} images)")
    for col in ("model", "params", "size MB", "mAP@0.5:0.95 %", "mAP@0.5 %", "train s"):
        table.add_column(col, justify="right" if col != "model" else "left", overflow="fold")
    for label, m, secs in rows:
        table.add_row(label, f"{m['params'] / 1e6:.2f}M", f"{m['size_bytes'] / 1e6:.1f}", pct(m["map50_95"]),
                      pct(m["map50"]), secs)
    return table


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"student keeps [bold]{pct(s['student_keeps_teacher_map'])}%[/] of the teacher's mAP@0.5:0.95 "
             f"with {pct(s['student_params_ratio'])}% of its parameters"]
    if "distill_gain_over_baseline_map50_95" in s:
        lines.append(f"distillation vs no teacher: [bold]{100 * s['distill_gain_over_baseline_map50_95']:+.2f}[/] "
                     f"mAP@0.5:0.95 points, {100 * s['distill_gain_over_baseline_map50']:+.2f} mAP@0.5 points "
                     "(same student, same data, same seed)")
    return lines


SUMMARY = FamilySummary(
    primary_metric="map50_95",
    eval_columns=(("map50_95", "mAP@0.5:0.95 %"), ("map50", "mAP@0.5 %")),
    table=eval_table,
    lines=summary_lines,
)
