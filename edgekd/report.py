"""The summary table printed at the end of a run (and by `edgekd report`)."""

from __future__ import annotations

from rich.table import Table

from edgekd.progress import console
from edgekd.runfolder import RunFolder


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def summary_table(run: RunFolder) -> Table | None:
    stages = run.manifest().get("stages", {})
    ev = stages.get("eval", {}).get("metrics")
    if not ev:
        return None
    table = Table(title=f"edgekd run '{run.root.name}': test split ({ev['summary']['test_examples']} examples)")
    for col in ("model", "layers", "params", "size MB", "accuracy %", "macro-F1 %", "agrees w/ teacher %",
                "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    train_stage = {"teacher": "teacher", "student": "distill", "baseline": "baseline"}
    for name in ("teacher", "student", "baseline"):
        m = ev.get(name)
        if not m:
            continue
        secs = stages.get(train_stage[name], {}).get("metrics", {}).get("train_seconds")
        label = {"student": "student (distilled)", "baseline": "student (hard labels)"}.get(name, name)
        unknown = m["params"] is None  # a black-box or combined teacher: no weights here
        table.add_row(label, "—" if unknown else str(m["layers"]), "—" if unknown else f"{m['params'] / 1e6:.1f}M",
                      "—" if unknown else f"{m['size_bytes'] / 1e6:.1f}",
                      _pct(m["accuracy"]), _pct(m["macro_f1"]), _pct(m["agreement_with_teacher"]),
                      "—" if secs is None else f"{secs:.0f}")
    return table


def print_summary(run: RunFolder) -> None:
    table = summary_table(run)
    if table is None:
        console.print(f"{run.root}: no evaluation yet (run `edgekd eval`).")
        return
    console.print(table)
    s = run.manifest()["stages"]["eval"]["metrics"]["summary"]
    console.print(f"student keeps [bold]{_pct(s['student_keeps_teacher_accuracy'])}%[/] of the teacher's accuracy "
                  f"with {_pct(s['student_params_ratio'])}% of its parameters")
    if "distill_gain_over_baseline" in s:
        gain = 100 * s["distill_gain_over_baseline"]
        console.print(f"distillation vs hard labels: [bold]{gain:+.2f}[/] accuracy points (same student, same data)")
    console.print(f"run folder: {run.root}  (manifest: {run.manifest_path})")
