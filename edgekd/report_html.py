"""A run as one self-contained HTML page (`edgekd report RUN --html`).

The page shows the stages and their timings, the accuracy table of the eval stage, prune facts, export
parity, the quantize stage's guard decisions, and per benchmarked device profile the bench table and an
accuracy-vs-latency chart (inline SVG, a tooltip on hover). It needs no network: the style, the few lines
of script and the chart are all inside the file. Every string taken from the run folder is HTML-escaped.
A section with nothing to show says so instead of disappearing.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import yaml

from edgekd.devices.tables import METRIC_LABELS, headline_row, pareto_front, pareto_rows
from edgekd.report import family_summary, float_node_names, shipped_artifact, training_data
from edgekd.runfolder import RunFolder, atomic_write_text

REPORT_FILE = "report.html"

# The pipeline's stage order (pipeline.planned_stages), and for the optional ones, the recipe key that
# turns them on: a stage missing from the manifest is explained with it.
STAGE_ORDER = ("teacher", "distill", "baseline", "eval", "prune", "export", "quantize", "bench")
SWITCHES = {"baseline": ("baseline", "enabled"), "prune": ("prune", "enabled"), "export": ("export", "targets"),
            "quantize": ("quantize", "enabled"), "bench": ("bench", "enabled")}
TRAIN_STAGE = {"teacher": "teacher", "student": "distill", "baseline": "baseline"}


# --- formatting ------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if _finite(v) else "—"


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if _finite(v) else "—"


def _mb(size_bytes: Any) -> str:
    return f"{size_bytes / 1e6:.2f}" if _finite(size_bytes) else "—"  # MB = 10^6 bytes, as the summary and the size bar


def _pp(v: Any) -> str:
    return f"{100 * v:+.1f} pp" if _finite(v) else "—"


def _yes(v: Any) -> str:
    return {True: "yes", False: "no"}.get(v, "—")


NUMBER = re.compile(r"^[-+]?\d[\d.,]*(e[-+]?\d+)?\s?(pp|%|×|M)?$")


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """A table of plain values (escaped here); ``rows`` may hold ("text", "css class") pairs. Columns of
    numbers are right-aligned."""
    def text(v: Any) -> str:
        return str(v[0] if isinstance(v, tuple) else v)

    numeric = [all(NUMBER.match(text(r[i])) or text(r[i]) == "—" for r in rows)
               and any(NUMBER.match(text(r[i])) for r in rows) for i in range(len(headers))]

    def cell(tag: str, v: Any, i: int) -> str:
        classes = " ".join(c for c in ((v[1] if isinstance(v, tuple) else ""), "n" if numeric[i] else "") if c)
        attr = f' class="{_e(classes)}"' if classes else ""
        return f"<{tag}{attr}>{_e(text(v))}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def _none(text: str) -> str:
    return f'<p class="none">{_e(text)}</p>'


def _facts(pairs: list[tuple[str, Any]]) -> str:
    """A definition list; a value may be a ("text", "css class") pair; empty values are left out."""
    def dd(v: Any) -> str:
        return f'<dd class="{_e(v[1])}">{_e(v[0])}</dd>' if isinstance(v, tuple) else f"<dd>{_e(v)}</dd>"

    items = "".join(f"<dt>{_e(k)}</dt>{dd(v)}" for k, v in pairs if v not in (None, ""))
    return f'<dl class="facts">{items}</dl>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{_e(sid)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _verdict(passed: Any) -> tuple[str, str]:
    return {True: ("passed", "pass"), False: ("failed", "fail")}.get(passed, ("—", ""))


# --- reading the run folder ------------------------------------------------------------------------------


def primary_metric(manifest: dict[str, Any], bench: list[dict[str, Any]]) -> str:
    """The task's headline metric: recorded in the manifest by the pipeline; run folders written before
    that record it in their bench results, else it follows from the task family."""
    if manifest.get("primary_metric"):
        return str(manifest["primary_metric"])
    for data in bench:
        if data.get("metric"):
            return str(data["metric"])
    family = family_summary(manifest.get("task"))
    return family.primary_metric if family else "accuracy"


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _recipe(run: RunFolder) -> dict[str, Any]:
    try:
        data = yaml.safe_load(run.recipe_path.read_text()) if run.recipe_path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _bench_results(run: RunFolder) -> list[dict[str, Any]]:
    """results.json of every profile under bench/, by profile folder name."""
    bench = run.root / "bench"
    out = []
    for d in sorted(bench.iterdir()) if bench.is_dir() else []:
        f = d / "results.json"
        if f.is_file():
            data = json.loads(f.read_text())
            data["_folder"] = d.name
            out.append(data)
    return out


def _metric_value(metrics: Any, key: str) -> Any:
    return metrics.get(key) if isinstance(metrics, dict) else metrics


# --- sections --------------------------------------------------------------------------------------------


def _stage_detail(name: str, rec: dict[str, Any]) -> str:
    m = rec.get("metrics") or {}
    if name in ("teacher", "distill", "baseline") and _finite(m.get("train_seconds")):
        return f"training {m['train_seconds']:.1f} s" + ("" if m.get("finetuned", True) else " (no fine-tune)")
    if name == "eval":
        n = (m.get("summary") or {})
        count = n.get("test_examples", n.get("test_images"))
        return f"{count} test {'images' if 'test_images' in n else 'examples'}" if count is not None else ""
    if name == "export":
        targets = m.get("targets") or {}
        return ", ".join(f"{t}: {r.get('status') or ('ok' if r.get('built') else 'not built')}"
                         for t, r in targets.items())
    if name == "quantize" and m.get("recommended"):
        return f"{m.get('precision', '')} candidate {m.get('candidate', '')}; recommends {m['recommended']}"
    if name == "bench":
        return f"profile {m.get('profile')}, {len(m.get('models') or {})} models"
    if name == "prune" and _finite(m.get("params_after")):
        return f"params {m.get('params_before')} → {m['params_after']}"
    return ""


def stages_section(manifest: dict[str, Any], recipe: dict[str, Any], stale: dict[str, str] | None = None) -> str:
    """``stale``: stage -> why its record no longer follows from the records it was made from
    (``RunFolder.superseded``), marked "out of date" as the console summary marks it."""
    stages = manifest.get("stages") or {}
    stale = stale or {}
    names = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    rows = []
    for name in names:
        rec = stages[name]
        status = (rec.get("status", "—"), "pass" if rec.get("status") == "done" else "fail")
        detail = _stage_detail(name, rec)
        if stale.get(name):
            status = ("out of date", "fail")
            detail = f"out of date ({stale[name]}; run `edgekd run` to redo it): {detail}"
        rows.append([name, status, _num(rec.get("seconds"), ".2f"), rec.get("finished") or "—", detail])
    for name in STAGE_ORDER:
        if name in stages:
            continue
        why = "not run yet"
        if name in SWITCHES and recipe:
            section, key = SWITCHES[name]
            if not (recipe.get(section) or {}).get(key):
                why = f"not in this run: {section}.{key} is {(recipe.get(section) or {}).get(key)!r} in recipe.yaml"
        rows.append([name, ("not run", "muted"), "—", "—", why])
    last = manifest.get("last_invocation") or {}
    total = ""
    if _finite(last.get("seconds")):
        total = (f"<p>Last command: stages {_e(', '.join(last.get('stages') or []))} in "
                 f"{_e(_num(last['seconds'], '.1f'))} s.</p>")
    if not stages:
        return _section("stages", "Stages and timings",
                        _none("No stage has finished in this run folder yet.") + _table(
                            ["stage", "status", "seconds", "finished (UTC)", "detail"], rows, "stages"))
    return _section("stages", "Stages and timings",
                    _table(["stage", "status", "seconds", "finished (UTC)", "detail"], rows, "stages") + total)


def accuracy_section(manifest: dict[str, Any], metric: str, stale: str | None = None) -> str:
    """``stale``: why the eval record no longer follows from the models it scored, said above the table."""
    stages = manifest.get("stages") or {}
    ev = (stages.get("eval") or {}).get("metrics")
    if not ev:
        return _section("accuracy", "Accuracy", _none("No evaluation yet: run `edgekd eval` on this run."))
    models = [(n, ev[n]) for n in ("teacher", "student", "baseline") if isinstance(ev.get(n), dict)]
    family = family_summary(manifest.get("task"))
    # The family's eval metric columns, in its order; a column appears when any model has it.
    columns = family.eval_columns if family else ((metric, _metric_label(metric)),)
    cols = [(k, label) for k, label in columns if any(m.get(k) is not None for _, m in models)]
    cols.sort(key=lambda c: c[0] != metric)  # the primary metric first
    layers = any(m.get("layers") is not None for _, m in models)
    headers = ["model"] + (["layers"] if layers else []) + ["params", "size MB"] + [lab for _, lab in cols]
    headers.append("train s")
    rows = []
    for name, m in models:
        label = {"student": "student (distilled)", "baseline": "student (no teacher)"}.get(name, name)
        secs = ((stages.get(TRAIN_STAGE[name]) or {}).get("metrics") or {}).get("train_seconds")
        row: list[Any] = [label] + ([m.get("layers") if m.get("layers") is not None else "—"] if layers else [])
        row += [f"{m['params'] / 1e6:.3f}M" if _finite(m.get("params")) else "—", _mb(m.get("size_bytes"))]
        row += [_pct(m.get(k)) for k, _ in cols] + [_num(secs, ".1f")]
        rows.append(row)
    s = ev.get("summary") or {}
    lines = []
    examples = s.get("test_examples", s.get("test_images"))
    if examples is not None:
        lines.append(f"Test split: {examples} {'images' if 'test_images' in s else 'examples'}; "
                     f"primary metric: {_metric_label(metric)}.")
    keeps = s.get("student_keeps_teacher_accuracy", s.get("student_keeps_teacher_map"))
    if _finite(keeps):
        lines.append(f"The student keeps {_pct(keeps)}% of the teacher's {_metric_label(metric)} with "
                     f"{_pct(s.get('student_params_ratio'))}% of its parameters.")
    gain = s.get("distill_gain_over_baseline", s.get("distill_gain_over_baseline_map50_95"))
    if _finite(gain):
        lines.append(f"Distillation against the same student trained without a teacher: {100 * gain:+.2f} "
                     f"{_metric_label(metric)} points ({training_data(s)}).")
    elif "baseline" not in ev:
        lines.append("No baseline student in this run (baseline.enabled is false): the gain from distillation "
                     "is not measured.")
    body = _table(headers, rows, "accuracy") + "".join(f"<p>{_e(line)}</p>" for line in lines)
    if stale:
        body = (f'<p class="fail"><strong>Out of date</strong>: this table is the eval stage\'s record, and '
                f"{_e(stale)}: run <code>edgekd run</code> to score the current models.</p>" + body)
    return _section("accuracy", "Accuracy (test split)", body)


def prune_section(manifest: dict[str, Any], metric: str) -> str:
    rec = (manifest.get("stages") or {}).get("prune")
    if not rec:
        return _section("prune", "Prune", _none("No prune stage in this run: the distilled student ships unpruned."))
    m = rec.get("metrics") or {}
    before, after = _metric_value(m.get("metric_before"), metric), _metric_value(m.get("metric_after"), metric)
    target = m.get("target") or {}
    return _section("prune", "Prune", _facts([
        ("method", f"{m.get('method', '—')} ({m.get('importance', '—')} importance, {m.get('scope', '—')})"),
        ("parameters", f"{m.get('params_before', '—')} → {m.get('params_after', '—')}"),
        ("sparsity", _pct(m.get("sparsity")) + " %"),
        (f"validation {_metric_label(metric)}", f"{_num(before, '.4f')} → {_num(after, '.4f')}"),
        ("target", ", ".join(f"{k} {v}" for k, v in target.items()) or "—"),
        ("target reached", _yes(m.get("target_reached"))),
        ("size MB", _mb(m.get("size_bytes"))),
    ]))


def parity_section(manifest: dict[str, Any], metric: str) -> str:
    rec = (manifest.get("stages") or {}).get("export")
    targets = ((rec or {}).get("metrics") or {}).get("targets") or {}
    if not targets:
        return _section("parity", "Export parity", _none("No export stage in this run: nothing was exported "
                                                         "(set export.targets, or run `edgekd export RUN --to onnx`)."))
    boxes = any((r.get("parity") or {}).get("box_agreement") is not None for r in targets.values())
    headers = ["target", "status", "precision", "size MB", "parity", "top-1 agreement"]
    headers += (["box agreement"] if boxes else []) + ["max |diff|", f"artifact {_metric_label(metric)}",
                                                        f"source {_metric_label(metric)}", "note"]
    rows = []
    for name, r in targets.items():
        p = r.get("parity") or {}
        status = r.get("status") or ("ok" if r.get("built") else "not built")
        verdict = _verdict(p.get("passed")) if p.get("ran", bool(p)) else ("not checked", "muted")
        row: list[Any] = [name, status, r.get("precision") or "—", _mb(r.get("size_bytes")), verdict,
                          _pct(p.get("top1_agreement"))]
        row += [_pct(p.get("box_agreement"))] if boxes else []
        row += [_num(p.get("max_abs_diff"), ".2e"), _num(_metric_value(p.get("artifact_metric"), metric), ".4f"),
                _num(_metric_value(p.get("source_metric"), metric), ".4f"),
                str(r.get("reason") or r.get("error") or "").splitlines()[0] if (r.get("reason") or r.get("error"))
                else ""]
        rows.append(row)
    src = (rec.get("metrics") or {}).get("source_stage")
    body = (f"<p>Each artifact against the model it was exported from{_e(f' ({src} stage)') if src else ''}, "
            "on the same test examples.</p>" + _table(headers, rows, "parity"))
    return _section("parity", "Export parity", body)


def quantize_section(manifest: dict[str, Any], metric: str, recipe: dict[str, Any]) -> str:
    rec = (manifest.get("stages") or {}).get("quantize")
    if not rec:
        off = recipe and not (recipe.get("quantize") or {}).get("enabled")
        why = " (quantize.enabled is false in recipe.yaml)" if off else ""
        return _section("guard", "Quantize: guard decisions",
                        _none(f"No quantize stage in this run{why}: no quantized model, no guard decisions."))
    m = rec.get("metrics") or {}
    parts = []
    rec_dir = m.get("recommended_dir")
    parts.append(_facts([
        ("method", f"{m.get('method', '—')} → {m.get('precision', '—')}"),
        ("recommended", f"{m.get('recommended', '—')}" + (f" ({Path(str(rec_dir)).name}/)" if rec_dir else "")),
    ]))
    reasons = m.get("reasons") or []
    if reasons:
        parts.append('<ul class="reasons">' + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    g = m.get("accuracy_guard") or {}
    if g:
        float_v, quant_v = g.get("float_metric", g.get("float")), g.get("quantized_metric", g.get("quantized"))
        parts.append("<h3>Accuracy guard</h3>" + _facts([
            ("verdict", _verdict(g.get("passed"))),
            ("metric", f"validation {_metric_label(str(g.get('metric', metric)))}"),
            ("float → quantized", f"{_num(_metric_value(float_v, str(g.get('metric', metric))), '.4f')} → "
                                  f"{_num(_metric_value(quant_v, str(g.get('metric', metric))), '.4f')}"),
            ("drop / budget", f"{_num(g.get('drop'), '.4f')} / {_num(g.get('budget'), '.4f')}"),
            ("attempts", len(g["attempts"]) if isinstance(g.get("attempts"), list) else None),
            ("operators kept in float", ", ".join(float_node_names(g)) or "none"),
        ]))
    sg = m.get("speed_guard") or {}
    if sg:
        parts.append("<h3>Speed guard</h3>" + _facts([
            ("float p50 ms", _num((sg.get("float") or {}).get("p50_ms"), ".3f")),
            ("quantized p50 ms", _num((sg.get("quantized") or {}).get("p50_ms"), ".3f")),
            ("speed-up", _num(sg.get("speedup"), ".2f") + "×"),
            ("quantized faster", _yes(sg.get("quantized_faster"))),
            ("inputs", sg.get("inputs")),
            ("note", sg.get("note")),
        ]))
    cands = m.get("candidates") or []
    if cands:
        rows = [[c.get("name", "—"), _verdict(c.get("passed")), _num(c.get("drop"), ".4f"), _num(c.get("metric"), ".4f"),
                 _num(c.get("p50_ms"), ".3f"), _mb(c.get("size_bytes")),
                 ("chosen", "pass") if c.get("chosen") else "", c.get("why") or ""] for c in cands]
        parts.append("<h3>Candidates</h3>" + _table(
            ["candidate", "accuracy guard", "drop", f"validation {_metric_label(metric)}", "p50 ms", "size MB",
             "chosen", "why"], rows, "candidates"))
    test = m.get("test") or {}
    if test:
        parts.append(f"<p>Test {_e(_metric_label(metric))}: float "
                     f"{_e(_num(_metric_value(test.get('float'), metric), '.4f'))}, quantized "
                     f"{_e(_num(_metric_value(test.get('quantized'), metric), '.4f'))}.</p>")
    return _section("guard", "Quantize: guard decisions", "\n".join(parts))


# --- bench table and chart -------------------------------------------------------------------------------


def _bench_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [headline_row(e, data["headline"]) for e in data.get("results") or []]
    return sorted(rows, key=lambda r: (r.get("kind") != "torch", str(r.get("target")), str(r.get("precision")),
                                       str(r.get("name"))))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 per decade over up to two decades; powers of ten alone over more."""
    steps = (1, 2, 5) if math.log10(hi / lo) <= 2 else (1,)
    ticks = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10**k for m in steps if lo <= m * 10**k <= hi]
    return ticks


def chart_svg(rows: list[dict[str, Any]], metric: str, teacher: float | None, title: str) -> str:
    """Accuracy (the primary metric) against p50 latency, one <circle class="pt"> per model with its
    figures in data-* attributes and a <title>; the Pareto front joined by a line."""
    pts = [r for r in rows if _finite(r.get("p50_ms")) and _finite(r.get("accuracy"))]
    if not pts:
        return _none("No chart: no model has both a p50 latency and a " + _metric_label(metric) + ".")
    W, H, L, R, T, B = 720, 380, 64, 150, 28, 48
    xs, ys = [r["p50_ms"] for r in pts], [r["accuracy"] for r in pts] + ([teacher] if _finite(teacher) else [])
    log = min(xs) > 0 and max(xs) / min(xs) > 20
    if log:
        lo, hi = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
        xticks = _log_ticks(10**lo, 10**hi) or [min(xs), max(xs)]

        def fx(v: float) -> float:
            return L + (math.log10(v) - lo) / (hi - lo) * (W - L - R)
    else:
        span = (max(xs) - min(xs)) or max(xs) or 1.0
        lo, hi = max(0.0, min(xs) - 0.1 * span), max(xs) + 0.1 * span
        xticks = _nice_ticks(lo, hi)

        def fx(v: float) -> float:
            return L + (v - lo) / (hi - lo) * (W - L - R)
    yspan = (max(ys) - min(ys)) or 0.05
    ylo, yhi = min(ys) - 0.15 * yspan, max(ys) + 0.15 * yspan
    if min(ys) >= 0:
        ylo = max(ylo, 0.0)  # metrics are never negative

    def fy(v: float) -> float:
        return T + (yhi - v) / (yhi - ylo) * (H - T - B)

    out = [f'<svg class="chart" data-metric="{_e(_metric_label(metric))}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{L}" y="16" class="ctitle">{_e(title)}</text>']
    for t in xticks:
        x = fx(t)
        if L <= x <= W - R:
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}"/>'
                       f'<text class="tick" x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(ylo, yhi):
        y = fy(t)
        if T <= y <= H - B:
            out.append(f'<line class="grid" x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}"/>'
                       f'<text class="tick" x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<rect class="frame" x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}"/>')
    out.append(f'<text class="axis" x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">p50 latency (ms'
               f'{", log scale" if log else ""})</text>')
    out.append(f'<text class="axis" transform="translate(14 {(T + H - B) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{_e(_metric_label(metric))}</text>')
    if _finite(teacher):
        y = fy(teacher)
        out.append(f'<line class="teacher" x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{W - R + 4}" y="{y + 4:.1f}">teacher {_e(_metric_label(metric))}</text>')
    front = pareto_front([(r["p50_ms"], r["accuracy"]) for r in pts])
    if len(front) > 1:
        xy = [(fx(pts[i]["p50_ms"]), fy(pts[i]["accuracy"])) for i in front]
        steps = [xy[0]] + [p for a, b in zip(xy[:-1], xy[1:], strict=True) for p in ((b[0], a[1]), b)]  # as matplotlib's steps-post
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in steps)
        out.append(f'<polyline class="front" points="{line}"/>')
    for i, r in enumerate(pts):
        lat, acc, size = _num(r["p50_ms"], ".3f"), _num(r["accuracy"], ".4f"), _mb(r.get("size_bytes"))
        tip = f"{r['name']}: p50 {lat} ms, {_metric_label(metric)} {acc}, {size} MB"
        cls = "pt front-pt" if i in front else "pt"
        x, y = fx(r["p50_ms"]), fy(r["accuracy"])
        out.append(f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="6" data-name="{_e(r["name"])}" '
                   f'data-latency="{_e(lat)}" data-accuracy="{_e(acc)}" data-size="{_e(size)}">'
                   f'<title>{_e(tip)}</title></circle>'
                   f'<text class="plabel" x="{x + 8:.1f}" y="{y - 8:.1f}">{_e(r["name"])}</text>')
    out.append("</svg>")
    legend = ('<p class="legend"><span class="sw front-sw"></span> Pareto front (no other model is both faster '
              'and more accurate) <span class="sw pt-sw"></span> measured'
              + (' <span class="sw teacher-sw"></span> teacher reference' if _finite(teacher) else "") + "</p>")
    return '<div class="chartbox">' + "\n".join(out) + "</div>" + legend


def bench_section(run: RunFolder, results: list[dict[str, Any]], metric: str) -> str:
    if not results:
        return _section("bench", "Bench", _none(
            f"No bench results yet: run `edgekd bench {run.root}` to measure latency, memory and "
            f"{_metric_label(metric)} of every export."))
    parts = []
    for data in results:
        prof = data.get("profile") or {}
        m = str(data.get("metric") or metric)
        label = _metric_label(m)
        head = data.get("headline") or {}
        env = data.get("environment") or {}
        ref = data.get("reference") or {}
        inp = data.get("inputs") or {}
        facts = _facts([
            ("profile", f"{prof.get('name', data['_folder'])}: {prof.get('description', '')}".rstrip(": ")),
            ("CPU", (env.get("cpu") or {}).get("model") or prof.get("processor")),
            ("case shown", f"batch {head.get('batch')}, " + (data.get("input") or {
                None: "one shared length", "real": "real lengths"}.get(head.get("seq"), f"sequence {head.get('seq')}"))),
            ("inputs", inp.get("description")),
            (f"reference {label}", f"teacher {_num(ref.get('teacher'), '.4f')}, fp32 student "
                                   f"{_num(ref.get('student'), '.4f')}"),
            ("created", data.get("created")),
        ])
        rows = _bench_rows(data)
        table = _table(
            ["model", "target", "precision", "size MB", "p50 ms", "p99 ms", "items/s", label, "Δ vs teacher",
             "Δ vs student", "status", "note"],
            [[r.get("name"), r.get("target") or "—", r.get("precision") or "—", _mb(r.get("size_bytes")),
              _num(r.get("p50_ms"), ".3f"), _num(r.get("p99_ms"), ".3f"), _num(r.get("throughput"), ".1f"),
              _num(r.get("accuracy"), ".4f"), _pp(r.get("delta_vs_teacher")), _pp(r.get("delta_vs_student")),
              (r.get("status") or "—", "pass" if r.get("status") == "ok" else "muted"), r.get("note") or ""]
             for r in rows], "bench")
        title = f"{data.get('run') or run.root.name} on {prof.get('name', data['_folder'])}: {label} vs p50 latency"
        # The chart puts only rows timed on the same recorded inputs side by side, as pareto.png does.
        plotted, left_out = pareto_rows(rows, data.get("results") or [])
        chart = chart_svg(plotted, m, ref.get("teacher"), title)
        if left_out:
            chart += f'<p class="meta">Chart: {_e(left_out)}</p>'
        parts.append(f'<div class="profile" id="bench-{_e(data["_folder"])}">'
                     f"<h3>Profile {_e(prof.get('name', data['_folder']))}</h3>{facts}{table}{chart}</div>")
    return _section("bench", "Bench", "\n".join(parts))


# --- page ------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
 color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
 padding-bottom:4px} h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;max-width:420px}
th{background:#f3f5f7} th.n,td.n{text-align:right}
.pass{color:#116329;font-weight:600} .fail{color:#b3261e;font-weight:600} .muted{color:#6e7781}
p.none{background:#fff8e1;border-left:4px solid #d4a72c;padding:6px 10px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:6px 0}
dl.facts dt{color:#57606a} dl.facts dd{margin:0}
.meta{color:#57606a}
.chartbox{position:relative;display:inline-block}
svg.chart{background:#fff;border:1px solid #d0d7de}
svg .grid{stroke:#eaeef2} svg .frame{fill:none;stroke:#8c959f} svg .tick{font-size:11px;fill:#57606a}
svg .axis{font-size:12px;fill:#1d232a} svg .ctitle{font-size:13px;font-weight:600;fill:#1d232a}
svg .plabel{font-size:10px;fill:#57606a;pointer-events:none}
svg .pt{fill:#8c959f;stroke:#fff;stroke-width:1.5;cursor:pointer} svg .front-pt{fill:#cf222e}
svg .pt:hover{stroke:#1d232a;stroke-width:2}
svg .front{fill:none;stroke:#cf222e;stroke-width:1.5}
svg .teacher{stroke:#0969da;stroke-dasharray:5 4}
.legend{font-size:12px;color:#57606a} .sw{display:inline-block;width:10px;height:10px;border-radius:5px;
 margin-left:10px} .front-sw{background:#cf222e} .pt-sw{background:#8c959f}
.teacher-sw{background:#0969da;height:2px;border-radius:0}
#tip{position:absolute;display:none;background:#1d232a;color:#fff;padding:6px 9px;border-radius:4px;
 font-size:12px;pointer-events:none;white-space:nowrap;z-index:10}
#tip b{display:block}
"""

# Hover on a chart point: a tooltip with its name and figures, read from the point's data-* attributes
# (textContent, never HTML).
SCRIPT = """
(function(){
  var tip=document.getElementById('tip');
  function line(t){var d=document.createElement('div');d.textContent=t;return d;}
  document.querySelectorAll('svg.chart .pt').forEach(function(c){
    var metric=c.closest('svg').getAttribute('data-metric');
    c.addEventListener('mouseenter',function(ev){
      tip.replaceChildren();
      var b=document.createElement('b');b.textContent=c.dataset.name;tip.appendChild(b);
      tip.appendChild(line('p50 latency: '+c.dataset.latency+' ms'));
      tip.appendChild(line(metric+': '+c.dataset.accuracy));
      tip.appendChild(line('size: '+c.dataset.size+' MB'));
      tip.style.display='block';
      tip.style.left=(ev.pageX+12)+'px';tip.style.top=(ev.pageY+12)+'px';
    });
    c.addEventListener('mouseleave',function(){tip.style.display='none';});
  });
})();
"""


def render(run: RunFolder) -> str:
    """The whole page as a string."""
    manifest = run.manifest()
    recipe = _recipe(run)
    results = _bench_results(run)
    metric = primary_metric(manifest, results)
    stale = {name: why for name in (manifest.get("stages") or {}) if (why := run.superseded(name))}
    ships, ships_why = shipped_artifact(run)
    env = manifest.get("environment") or {}
    pkgs = env.get("packages") or {}
    name = manifest.get("name") or run.root.name
    meta = _facts([
        ("task", manifest.get("task")),
        ("primary metric", _metric_label(metric)),
        ("edgekd", manifest.get("edgekd_version")),
        ("last updated", manifest.get("updated")),
        ("machine", f"{env.get('cpu', '—')}, {env.get('cpu_count', '—')} CPUs; Python {env.get('python', '—')}"
                    + (f"; torch {pkgs['torch']}" if pkgs.get("torch") else "") if env else None),
        ("run folder", str(run.root.resolve())),
        ("ships", f"export/{ships}: {ships_why}" if ships else ships_why),
    ])
    body = "\n".join([
        stages_section(manifest, recipe, stale),
        accuracy_section(manifest, metric, stale.get("eval")),
        prune_section(manifest, metric),
        parity_section(manifest, metric),
        quantize_section(manifest, metric, recipe),
        bench_section(run, results, metric),
    ])
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>edgekd run {_e(name)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f"<h1>edgekd run '{_e(name)}'</h1>\n{meta}\n{body}\n"
        f'<p class="meta">Written {_e(made)} by <code>edgekd report --html</code> from '
        f"{_e(run.manifest_path.resolve())}.</p>\n"
        f'<div id="tip" role="tooltip"></div>\n<script>{SCRIPT}</script>\n</body></html>\n'
    )


def write_html(run: RunFolder, out: str | Path | None = None) -> Path:
    """Render the report and write it atomically (default: RUN/report.html); return its path."""
    path = Path(out) if out is not None else run.root / REPORT_FILE
    atomic_write_text(path, render(run))
    return path
