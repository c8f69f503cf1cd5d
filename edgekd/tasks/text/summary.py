"""What text classification adds to a run's summary (``edgekd.report``): the eval table of teacher
and students by accuracy, and how much of the teacher's accuracy the student keeps."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from edgekd.report import FamilySummary, eval_rows, pct, training_data
from edgekd.runfolder import RunFolder


def eval_table(run: RunFolder) -> Table | None:
    found = eval_rows(run, "student (hard labels)")
    if found is None:
        return None
    ev, rows = found
    table = Table(title=f"edgekd run '{run.root.name}': test split ({ev['summary']['test_examples']} examples)")
    for col in ("model", "layers", "params", "size MB", "accuracy %", "macro-F1 %", "agrees w/ teacher %",
                "train s"):
        table.add_column(col, justify="right" if col != "model" else "left", overflow="fold")
    for label, m, secs in rows:
        unknown = m["params"] is None  # a black-box or combined teacher: no weights here
        table.add_row(label, "—" if unknown else str(m["layers"]), "—" if unknown else f"{m['params'] / 1e6:.1f}M",
                      "—" if unknown else f"{m['size_bytes'] / 1e6:.1f}",
                      pct(m["accuracy"]), pct(m["macro_f1"]), pct(m["agreement_with_teacher"]), secs)
    return table


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"student keeps [bold]{pct(s['student_keeps_teacher_accuracy'])}%[/] of the teacher's accuracy "
             f"with {pct(s['student_params_ratio'])}% of its parameters"]
    if "distill_gain_over_baseline" in s:
        lines.append(f"distillation vs hard labels: [bold]{100 * s['distill_gain_over_baseline']:+.2f}[/] accuracy "
                     f"points ({training_data(s)})")
    return lines



SUMMARY = FamilySummary(
    primary_metric="accuracy",
    eval_columns=(("accuracy", "accuracy %"), ("macro_f1", "macro-F1 %"),
                  ("agreement_with_teacher", "agrees w/ teacher %"), ("ood_accuracy", "OOD accuracy %")),
    table=eval_table,
    lines=summary_lines,
)
