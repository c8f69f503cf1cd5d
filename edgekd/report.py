"""The summary table printed at the end of a run (and by `edgekd report`)."""

from __future__ import annotations

from rich.table import Table

from edgekd.progress import console
from edgekd.runfolder import RunFolder


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


TRAIN_STAGE = {"teacher": "teacher", "student": "distill", "baseline": "baseline"}


def detection_table(run: RunFolder) -> Table | None:
    stages = run.manifest().get("stages", {})
    ev = stages.get("eval", {}).get("metrics")
    if not ev:
        return None
    table = Table(title=f"edgekd run '{run.root.name}': test split ({ev['summary']['test_images']} images)")
    for col in ("model", "params", "size MB", "mAP@0.5:0.95 %", "mAP@0.5 %", "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in ("teacher", "student", "baseline"):
        m = ev.get(name)
        if not m:
            continue
        secs = stages.get(TRAIN_STAGE[name], {}).get("metrics", {}).get("train_seconds")
        label = {"student": "student (distilled)", "baseline": "student (no teacher)"}.get(name, name)
        table.add_row(label, f"{m['params'] / 1e6:.2f}M", f"{m['size_bytes'] / 1e6:.1f}", _pct(m["map50_95"]),
                      _pct(m["map50"]), "—" if secs is None else f"{secs:.0f}")
    return table


def _detection_lines(s: dict) -> list[str]:
    lines = [f"student keeps [bold]{_pct(s['student_keeps_teacher_map'])}%[/] of the teacher's mAP@0.5:0.95 "
             f"with {_pct(s['student_params_ratio'])}% of its parameters"]
    if "distill_gain_over_baseline_map50_95" in s:
        lines.append(f"distillation vs no teacher: [bold]{100 * s['distill_gain_over_baseline_map50_95']:+.2f}[/] "
                     f"mAP@0.5:0.95 points, {100 * s['distill_gain_over_baseline_map50']:+.2f} mAP@0.5 points "
                     "(same student, same data, same seed)")
    return lines


def _text_lines(s: dict) -> list[str]:
    lines = [f"student keeps [bold]{_pct(s['student_keeps_teacher_accuracy'])}%[/] of the teacher's accuracy "
             f"with {_pct(s['student_params_ratio'])}% of its parameters"]
    if "distill_gain_over_baseline" in s:
        lines.append(f"distillation vs hard labels: [bold]{100 * s['distill_gain_over_baseline']:+.2f}[/] accuracy "
                     "points (same student, same data)")
    return lines


def summary_table(run: RunFolder) -> Table | None:
    stages = run.manifest().get("stages", {})
    ev = stages.get("eval", {}).get("metrics")
    if not ev:
        return None
    table = Table(title=f"edgekd run '{run.root.name}': test split ({ev['summary']['test_examples']} examples)")
    for col in ("model", "layers", "params", "size MB", "accuracy %", "macro-F1 %", "agrees w/ teacher %",
                "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in ("teacher", "student", "baseline"):
        m = ev.get(name)
        if not m:
            continue
        secs = stages.get(TRAIN_STAGE[name], {}).get("metrics", {}).get("train_seconds")
        label = {"student": "student (distilled)", "baseline": "student (hard labels)"}.get(name, name)
        unknown = m["params"] is None  # a black-box or combined teacher: no weights here
        table.add_row(label, "—" if unknown else str(m["layers"]), "—" if unknown else f"{m['params'] / 1e6:.1f}M",
                      "—" if unknown else f"{m['size_bytes'] / 1e6:.1f}",
                      _pct(m["accuracy"]), _pct(m["macro_f1"]), _pct(m["agreement_with_teacher"]),
                      "—" if secs is None else f"{secs:.0f}")
    return table


def print_summary(run: RunFolder) -> None:
    detection = run.manifest().get("task") == "detection"
    table = detection_table(run) if detection else summary_table(run)
    if table is None:
        console.print(f"{run.root}: no evaluation yet (run `edgekd eval`).")
        return
    console.print(table)
    s = run.manifest()["stages"]["eval"]["metrics"]["summary"]
    for line in _detection_lines(s) if detection else _text_lines(s):
        console.print(line)
    console.print(f"run folder: {run.root}  (manifest: {run.manifest_path})")
