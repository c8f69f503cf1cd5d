"""The summary printed at the end of a command and by `edgekd report`, built from the manifest alone.

One table of every stage the run folder holds (what the last command did with it, its time and its
headline: accuracy, what pruning removed, export parity, the quantize guard's decisions, the fastest
benchmarked model), the accuracy table of the eval stage, then the artifact to ship and the command
that serves it. The end of `edgekd run` and `edgekd report RUN` print the same thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from edgekd.progress import console
from edgekd.runfolder import RunFolder


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


TRAIN_STAGE = {"teacher": "teacher", "student": "distill", "baseline": "baseline"}


@dataclass(frozen=True)
class FamilySummary:
    """What a task family adds to the summary: ``SUMMARY`` in its package's ``summary.py``."""

    primary_metric: str  # the eval metric runs of this family are judged by (manifests that do not record it)
    eval_columns: tuple[tuple[str, str], ...]  # (eval metric key, column title) of the accuracy tables
    table: Callable[[RunFolder], Table | None]  # the accuracy table of the run's models (None: no figures yet)
    lines: Callable[[dict[str, Any]], list[str]]  # headline lines from the eval stage's summary


def eval_rows(run: RunFolder, baseline: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any], str]]] | None:
    """The eval stage's metrics and, in table order, each model it scored as (row label, its metrics,
    its training time); ``baseline`` names the no-teacher student. None before the eval stage ran."""
    stages = run.manifest().get("stages", {})
    ev = stages.get("eval", {}).get("metrics")
    if not ev:
        return None
    rows = []
    for name in ("teacher", "student", "baseline"):
        if m := ev.get(name):
            secs = stages.get(TRAIN_STAGE[name], {}).get("metrics", {}).get("train_seconds")
            label = {"student": "student (distilled)", "baseline": baseline}.get(name, name)
            rows.append((label, m, "—" if secs is None else f"{secs:.0f}"))
    return ev, rows


def family_summary(task: str | None) -> FamilySummary | None:
    """The summary side of the family registered as ``task`` (runs written before tasks were
    recorded are text classifiers); None for a task this installation does not know."""
    from edgekd.registry import DEFAULT_TASK, TASKS

    package = TASKS.get(task or DEFAULT_TASK)
    return None if package is None else importlib.import_module(f"{package}.summary").SUMMARY


# --- every stage ----------------------------------------------------------------------------------

STAGE_ORDER = ("teacher", "distill", "baseline", "eval", "prune", "export", "quantize", "bench")


def primary_metric(manifest: dict[str, Any]) -> tuple[str, str]:
    """(key, name) of the metric the run is judged by (recorded in the manifest; older runs: by task)."""
    from edgekd.devices.tables import METRIC_LABELS

    family = family_summary(manifest.get("task"))
    key = manifest.get("primary_metric") or (family.primary_metric if family else "accuracy")
    return key, METRIC_LABELS.get(key, key)


def _m(metrics: dict | None, key: str) -> str:
    v = (metrics or {}).get(key)
    return "—" if v is None else f"{100 * v:.2f}%"


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min"


def _train_line(met: dict, key: str, name: str, what: str) -> str:
    parts = [what] if what else []
    if met.get("params") is not None:
        parts.append(f"{_params(met['params'])} params")
    if met.get("validation"):
        parts.append(f"validation {name} {_m(met['validation'], key)}")
    return "; ".join(parts)


def _teacher(met: dict, key: str, name: str) -> str:
    what = "fine-tuned" if met.get("finetuned") else "used as given (has its task head)"
    return _train_line(met, key, name, what)


def _student(stage: str):
    def line(met: dict, key: str, name: str) -> str:
        layers = met.get("layers_from_teacher")
        what = "distilled from the teacher" if stage == "distill" else "hard labels only (no teacher)"
        if layers:
            what += f", teacher layers {layers}"
        return _train_line(met, key, name, what)

    return line


def _eval(met: dict, key: str, name: str) -> str:
    s = met.get("summary") or {}
    n = s.get("test_examples") or s.get("test_images")
    who = [f"{w} {_m(met.get(w), key)}" for w in ("teacher", "student", "baseline") if met.get(w)]
    return f"test {name}: " + ", ".join(who) + (f" ({n} {'images' if 'test_images' in s else 'examples'})" if n else "")


STRUCTURES = {"heads_per_layer": "attention heads", "neurons_per_layer": "FFN neurons"}


def _structure(before: dict, after: dict) -> list[str]:
    """What pruning removed, per structure it counts (heads, FFN neurons, channels...)."""
    out = []
    for k, b in before.items():
        a = after.get(k)
        what = STRUCTURES.get(k, k.removesuffix("_per_layer").replace("_", " "))
        if isinstance(b, list) and isinstance(a, list) and all(isinstance(x, (int, float)) for x in b + a):
            if sum(b) != sum(a):
                out.append(f"{what} {sum(b):g} → {sum(a):g}")
        elif isinstance(b, (int, float)) and isinstance(a, (int, float)) and b != a and k != "encoder_params":
            out.append(f"{what} {b:g} → {a:g}")
    return out


def _prune(met: dict, key: str, name: str) -> str:
    lines = []
    b, a = met.get("params_before"), met.get("params_after")
    head = f"{met.get('method', 'prune')}: params {_params(b)} → {_params(a)}"
    if b and a is not None:
        head += f" ({100 * (1 - a / b):.0f}% removed)"
    pb, pa = met.get("prunable_params_before"), met.get("prunable_params_after")
    if pb and pa is not None and pb != b:  # channels prunes the whole network: the figure above says it
        part = "encoder layers" if met.get("method") == "heads-ffn" else "prunable weights"
        head += f"; prunable part ({part}) {_params(pb)} → {_params(pa)} ({100 * (1 - pa / pb):.0f}% removed)"
    lines.append(head)
    removed = _structure(met.get("before") or {}, met.get("after") or {})
    if removed:
        lines.append("; ".join(removed))
    v = met.get("vocab")
    if v:
        lines.append(f"vocabulary {v.get('vocab_before')} → {v.get('vocab_after')} tokens")
    if met.get("metric_before") or met.get("metric_after"):
        lines.append(f"validation {name} {_m(met.get('metric_before'), key)} → {_m(met.get('metric_after'), key)}")
    if met.get("target_reached") is False:
        lines.append(f"target NOT reached ({met.get('stopped') or met.get('target')})")
    return "\n".join(lines)


def _parity(p: dict | None) -> str:
    if not p:
        return "no parity check"
    if not p.get("ran"):
        graph = p.get("graph") or {}
        if graph.get("ran"):
            return (f"parity not run: {p.get('reason')}; its {graph.get('checks')}: "
                    f"{_parity({k: v for k, v in graph.items() if k != 'checks'})}")
        return f"parity not run: {p.get('reason')}"
    bits = []
    if p.get("top1_agreement") is not None:
        bits.append(f"top-1 {100 * p['top1_agreement']:.1f}%")
    if p.get("box_agreement") is not None:
        bits.append(f"boxes {100 * p['box_agreement']:.1f}%")
    if p.get("max_abs_diff") is not None:
        tol = p.get("tolerance") or {}
        bits.append(f"max diff {p['max_abs_diff']:.1e}" + (f" ({tol['text']})" if tol.get("text") else ""))
    return f"parity {'ok' if p.get('passed', True) else 'FAILED'} ({', '.join(bits)})"


def _export(met: dict, key: str, name: str) -> str:
    lines = []
    for target, rec in (met.get("targets") or {}).items():
        status = rec.get("status")
        if status == "ok":
            lines.append(f"{target}: {rec.get('precision', '')} {_parity(rec.get('parity'))}".replace("  ", " "))
        else:
            lines.append(f"{target}: {status}: {(rec.get('reason') or '').splitlines()[0] if rec.get('reason') else ''}")
    src = met.get("source_stage")
    if src:
        lines.append(f"source: the {'pruned' if src == 'prune' else 'distilled'} student")
    return "\n".join(lines)


def _quantize(met: dict, key: str, name: str) -> str:
    lines = []
    guard = met.get("accuracy_guard")
    if guard:
        g_name = guard.get("metric", key)
        drop, budget = guard.get("drop"), guard.get("budget")
        verdict = "passed" if guard.get("passed") else "FAILED"
        tries = len(guard.get("attempts") or [])
        line = (f"{met.get('precision') or met.get('method')} ({met.get('candidate')}): accuracy guard {verdict}"
                f" after {tries} attempt{'s' if tries != 1 else ''}")
        if drop is not None and budget is not None:
            line += f", {g_name} drop {100 * drop:.2f} pts (budget {100 * budget:.2f})"
        lines.append(line)
        kept = float_node_names(guard)
        lines.append(f"kept in float: {', '.join(kept)}" if kept else "kept in float: none")
    for c in met.get("candidates") or []:
        if not c.get("chosen") and c.get("name") != met.get("candidate"):
            lines.append(f"rejected {c.get('name')}: {c.get('why')}")
    speed = met.get("speed_guard") or {}
    if speed.get("speedup") is not None:
        lines.append(f"speed: ×{speed['speedup']:.2f} vs float at batch {speed.get('batch', 1)}")
    test = met.get("test") or {}
    if test.get("float") and test.get("quantized"):
        lines.append(f"test {name}: float {_m(test['float'], key)}, quantized {_m(test['quantized'], key)}")
    if met.get("recommended"):
        rec = f"recommended: {met['recommended']} ({Path(str(met.get('recommended_dir', ''))).name})"
        if met.get("reasons"):
            rec += ": " + "; ".join(met["reasons"])
        lines.append(rec)
    for target, r in (met.get("targets") or {}).items():
        lines.append(f"{target}: " + ("written" if r.get("written", True) else f"not written: {r.get('reason')}"))
    return "\n".join(lines)


def _bench(met: dict, key: str, name: str) -> str:
    models = met.get("models") or {}
    timed = {n: r for n, r in models.items() if r.get("p50_ms") is not None}
    head = met.get("headline") or {}
    where = f"{met.get('profile')}, batch {head.get('batch')}"
    if head.get("seq") is not None:
        where += f", {'real lengths' if head['seq'] == 'real' else 'sequence ' + str(head['seq'])}"
    lines = [f"{where}: {len(timed)} of {len(models)} models timed"]
    if timed:
        fast = min(timed, key=lambda n: timed[n]["p50_ms"])
        r = timed[fast]
        from edgekd.devices.tables import PRUNED_MARK

        mark = f" ({PRUNED_MARK})" if r.get("pruned") else ""
        lines.append(f"fastest: {fast}{mark}, {r['p50_ms']:.3f} ms p50, {name} {_m({key: r.get('accuracy')}, key)}")
    skipped = [n for n, r in models.items() if r.get("status") not in (None, "ok")]
    if skipped:
        lines.append(f"not timed: {', '.join(skipped)} (see the bench table's notes)")
    if met.get("target_latency"):
        from edgekd.stages.bench import target_latency_line

        lines.append(target_latency_line(met["target_latency"]))
    return "\n".join(lines)


def _shipped_not_fastest(manifest: dict, target: str) -> str | None:
    """Where the bench timed another export faster than the one that ships: both figures, side by side, and
    whose choice the shipped one is, so the bench's "fastest" and the "ship" line do not disagree unexplained."""
    stages = manifest.get("stages") or {}
    bench = (stages.get("bench") or {}).get("metrics") or {}
    timed = {n: r for n, r in (bench.get("models") or {}).items() if r.get("p50_ms") is not None}
    if target not in timed:
        return None
    fast = min(timed, key=lambda n: timed[n]["p50_ms"])
    if fast == target or timed[fast]["p50_ms"] >= timed[target]["p50_ms"]:
        return None
    batch = (bench.get("headline") or {}).get("batch")
    line = (f"note: the bench timed {target}, which ships, at {timed[target]['p50_ms']:.3f} ms p50 and {fast} at "
            f"{timed[fast]['p50_ms']:.3f} ms (batch {batch})")
    quantize = (stages.get("quantize") or {}).get("metrics") or {}
    speed = quantize.get("speed_guard") or {}
    if quantize.get("recommended") and speed.get("speedup") is not None:
        line += (f"; what ships is the quantize stage's choice, by its accuracy and speed guards on its own timing "
                 f"(×{speed['speedup']:.2f} at batch {speed.get('batch')}, {speed.get('inputs') or 'its inputs'})")
    return line


HEADLINES = {"teacher": _teacher, "distill": _student("distill"), "baseline": _student("baseline"), "eval": _eval,
             "prune": _prune, "export": _export, "quantize": _quantize, "bench": _bench}


def stages_table(run: RunFolder) -> Table | None:
    """Every stage the run folder holds: what the last command did with it, its time, its headline."""
    manifest = run.manifest()
    stages = manifest.get("stages") or {}
    if not stages:
        return None
    key, name = primary_metric(manifest)
    last = manifest.get("last_invocation") or {}
    ran, planned = set(last.get("ran") or []), set(last.get("stages") or [])
    table = Table(title=f"edgekd run '{run.root.name}': stages", title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("last command", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("result", overflow="fold")
    order = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    for stage in order:
        rec = stages[stage]
        if stage in ran:
            now = "ran"
        elif stage in planned:
            now = "unchanged" if "ran" in last else "ran or unchanged"
        else:
            now = "earlier"
        fn = HEADLINES.get(stage)
        try:
            text = fn(rec.get("metrics") or {}, key, name) if fn else ""
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # an older manifest's shape
            text = f"(summary unavailable: {type(e).__name__}: {e}; see manifest.json)"
        stale = run.superseded(stage)
        if stale:  # its figures are from before: said, not shown as the run's result
            now = f"{now}, out of date"
            text = f"out of date ({stale}; run `edgekd run` to redo it): {text}"
        table.add_row(stage, now, _seconds(rec.get("seconds")), escape(text))
    return table


def training_data(s: dict[str, Any]) -> str:
    """What the distilled and the baseline student trained on, as the gain's line says it: the same texts,
    or the distilled one also on the texts the teacher labelled (so the gain is not distillation's alone)."""
    d, b = s.get("distill_train_examples"), s.get("baseline_train_examples")
    if d is None or b is None:
        return "same student"
    if d == b:
        return f"same student, same {b:,} training texts"
    return (f"same student; distillation trained on {d:,} texts, the {b:,} labelled ones and copies or extra texts "
            f"the teacher labelled, the baseline on the {b:,} alone, so the gain is not distillation's alone")


def float_node_names(guard: dict[str, Any]) -> list[str]:
    """The operators the accuracy guard kept in float, each as "node (op type)" (records before op types: the name)."""
    return [n if isinstance(n, str) else f"{n.get('node')} ({n.get('op_type') or n.get('op') or '?'})"
            for n in guard.get("float_nodes") or []]


def shipped_artifact(run: RunFolder) -> tuple[str | None, str]:
    """(export folder name, why) of what the run ships, by the one rule `edgekd serve` follows without
    --target (``edgekd.shipping.shipped_export``); (None, why) when it ships nothing as it stands."""
    from edgekd.shipping import shipped_export

    return shipped_export(run.root)


def print_summary(run: RunFolder) -> None:
    """The stages, the accuracy table, and what to ship and how to serve it."""
    manifest = run.manifest()
    stages = stages_table(run)
    if stages is None:
        console.print(f"{run.root}: no stage has finished yet (run `edgekd run`).")
        return
    console.print(stages)
    family = family_summary(manifest.get("task"))
    table = family.table(run) if family else None
    if table is not None and family is not None:
        console.print(table)
        stale = run.superseded("eval")
        if stale:
            console.print(f"[bold]out of date[/]: the table above is the eval stage's record, and {escape(stale)}: "
                          "run `edgekd run` (or `edgekd eval`) to measure the current models.")
        ev = ((manifest.get("stages") or {}).get("eval") or {}).get("metrics") or {}
        for line in family.lines(ev["summary"]) if ev.get("summary") else []:
            console.print(line)
    else:
        console.print("no evaluation yet (run `edgekd eval`).")
    if "export" in (manifest.get("stages") or {}):
        target, why = shipped_artifact(run)
        if target:
            console.print(f"ship: [bold]{escape(str(run.root / 'export' / target))}[/] ({escape(why)})")
            console.print(f"serve it: [bold]edgekd serve {escape(str(run.root))} --target {escape(target)}[/]")
            slower = _shipped_not_fastest(manifest, target)
            if slower:
                console.print(escape(slower))
        else:
            console.print(f"ship: {escape(why)}")
    bench = ((manifest.get("stages") or {}).get("bench") or {}).get("metrics") or {}
    if bench.get("dir"):
        # this folder's own table (bench/<profile>/): the recorded absolute path names the folder the
        # bench ran in, another one once the run folder is copied or moved
        console.print(f"bench table: {escape(str(run.root / 'bench' / Path(bench['dir']).name / 'table.md'))}")
    console.print(f"run folder: {escape(str(run.root))}  (manifest: {escape(str(run.manifest_path))})",
                  soft_wrap=True)
