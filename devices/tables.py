"""Bench results as files people read: the markdown table, the CSV, the Pareto plot, and the side by
side report of two runs or two devices."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

from edgekd.devices.remote_runner import PEAK_COVERS
from edgekd.errors import StageError
from edgekd.runfolder import atomic_dir

# Column and axis names of the task metrics that fill the accuracy column.
METRIC_LABELS = {"accuracy": "accuracy", "map50_95": "mAP@0.5:0.95", "map50": "mAP@0.5"}

CSV_FIELDS = (
    "name", "kind", "target", "precision", "status", "batch", "seq", "input", "runs", "p50_ms", "p90_ms",
    "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput", "size_bytes", "load_s",
    "first_inference_s", "load_delta_mb", "peak_delta_mb", "accuracy", "ood_accuracy", "delta_vs_teacher",
    "delta_vs_student", "padding", "inputs_sha256", "note",
)


def headline_case(cfg: Any, real: bool = False) -> dict[str, Any]:
    """The case the table shows: the first batch size at the first sequence length ("real": each
    text at its own length; None: fixed-shape inputs, or the one length every model shares)."""
    seq = cfg.seq_lengths[0] if cfg.seq_lengths else ("real" if real else None)
    return {"batch": cfg.batch_sizes[0], "seq": seq}


def inputs_record(cfg: Any, inputs: Any, threads: int | None, rounds: int = 1,
                  threads_from: str | None = None, tokenizers: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every model of the bench was fed, for the table's header and results.json (``rounds``: how
    many rounds the timed calls were split over; fewer than ``bench.rounds`` asked only where the
    device's own tool times each model once, which the record then says; ``threads_from``: where the
    thread count came from, said beside it in the header; ``tokenizers``: where some rows read another
    tokenizer's ids of the same texts, the mean tokens per text in each and how many texts differ in length)."""
    if inputs.plan is not None:
        how = ("real lengths: each test text at its own length at batch 1; larger batches padded to their "
               "longest text")
    elif inputs.fixed_shape():
        how = "fixed-shape inputs"
    elif cfg.seq_lengths:
        how = f"every row padded or truncated to {', '.join(map(str, cfg.seq_lengths))} tokens"
    else:
        how = "one shared length for every model"
    if tokenizers and "original" in tokenizers:
        how += "; the same texts, in the same order and batches, for every row, each model fed its own tokenizer's ids"
    return {"mode": "real" if inputs.plan is not None else ("fixed" if cfg.seq_lengths else "shared"),
            "description": how, "source": "real" if inputs.examples is not None else "synthetic",
            "timed_calls": cfg.runs, "warmup_calls": cfg.warmup, "threads": threads,
            **({"threads_from": threads_from} if threads_from else {}),
            "rounds": rounds,
            **({"tokenizers": tokenizers} if tokenizers else {}),
            **({"rounds_note": f"bench.rounds {cfg.rounds} does not apply here: the device's own benchmark tool "
                               "times each model once"} if rounds == 1 and cfg.rounds > 1 and cfg.runs > 1 else {})}


def _rounds_text(inp: dict[str, Any]) -> str:
    rounds = inp.get("rounds")
    if inp.get("rounds_note"):
        return f" ({inp['rounds_note']})"
    if not rounds or rounds == 1:
        return ""
    return (f", in {rounds} rounds (every model once per round, each in its own process, in a rotated order, "
            "reversed every other round; the timed calls of every round pooled)")


def pick_case(entry: dict[str, Any], headline: dict[str, Any]) -> dict[str, Any] | None:
    cases = entry.get("cases") or []
    for case in cases:
        if case.get("batch") == headline["batch"] and (headline.get("seq") is None or case.get("seq") is None
                                                       or headline["seq"] == case.get("seq")):
            return case
    if entry.get("imported_from") and len(cases) == 1:
        return cases[0]  # a phone tool measures one shape; the case table shows which
    return None


def same_inputs(rows: list[dict[str, Any]], what: str = "this table") -> dict[str | None, str]:
    """Refuse rows timed on different inputs. Every timed row (a p50) is fed the same texts in the same
    order and batches (``plan_sha256``, the plan of text indices, where recorded: one for every row), and
    each model its own tokenizer's ids of them (``tokenizer``; None: the bench's one set of inputs): every
    timed row of one tokenizer must record the same arrays fingerprint (``inputs_sha256``). Where rows of
    more than one tokenizer are timed, each must record its plan, or nothing shows they read the same texts.
    Returns each tokenizer's fingerprint ({} when no row has one)."""
    prints: dict[str | None, dict[str, list[str]]] = {}
    plans: dict[str, list[str]] = {}
    unplanned: list[str] = []
    for r in rows:
        if r.get("p50_ms") is None or not r.get("inputs_sha256"):
            continue
        prints.setdefault(r.get("tokenizer"), {}).setdefault(r["inputs_sha256"], []).append(str(r.get("name")))
        if r.get("plan_sha256"):
            plans.setdefault(r["plan_sha256"], []).append(str(r.get("name")))
        else:
            unplanned.append(str(r.get("name")))
    again = "re-run `edgekd bench` (or compare_tools) so they are"
    if len(plans) > 1 or (len(prints) > 1 and unplanned):
        detail = "; ".join(f"{fp[:12]}…: {', '.join(names)}" for fp, names in plans.items())
        if len(prints) > 1 and unplanned:
            detail += f"{'; ' if detail else ''}no plan recorded: {', '.join(unplanned)}"
        raise StageError(
            f"{what} would put rows timed on different texts side by side (plans of text indices: {detail}). Every "
            f"model must be timed on the same texts, in the same order and batches: {again}."
        )
    for tok, fps in prints.items():
        if len(fps) > 1:
            detail = "; ".join(f"{fp[:12]}…: {', '.join(names)}" for fp, names in fps.items())
            whose = f" of the {tok} tokenizer" if tok else ""
            raise StageError(
                f"{what} would put rows{whose} timed on different inputs side by side ({detail}). Every model must be "
                f"timed on the same texts, lengths, padding and batches, each row of one tokenizer on the same arrays: "
                f"{again}."
            )
    return {tok: next(iter(fps)) for tok, fps in prints.items()}


def check_same_inputs(rows: list[dict[str, Any]], what: str = "this table") -> str | None:
    """:func:`same_inputs`; returns the shared fingerprint where every row was fed the same arrays (one
    tokenizer), else None."""
    fps = same_inputs(rows, what)
    return next(iter(fps.values())) if len(fps) == 1 else None


def fingerprints_text(fps: dict[str | None, str]) -> str:
    """The header's words for :func:`same_inputs`' fingerprints: one, or one per tokenizer."""
    if not fps:
        return "not recorded"
    if len(fps) == 1:
        return f"{next(iter(fps.values()))[:16]}…"
    return ", ".join(f"{tok or 'shipped'} tokenizer {fp[:16]}…" for tok, fp in sorted(fps.items(), key=lambda kv: str(kv[0])))


def tokenizers_text(tokenizers: dict[str, Any] | None) -> str:
    """Mean tokens per text in each tokenizer's ids, and how many texts differ in length between them
    (``tokenizers`` as compare_tools and the bench record it); "" with one tokenizer."""
    if not tokenizers or "original" not in tokenizers:
        return ""
    each = ", ".join(f"{who} {tokenizers[who]['mean_tokens_per_text']:.2f}" for who in ("shipped", "original")
                     if (tokenizers.get(who) or {}).get("mean_tokens_per_text") is not None)
    n, d = tokenizers.get("texts"), tokenizers.get("texts_differing_in_length")
    return (f"mean tokens per text: {each} (shipped: the trimmed tokenizer's ids; original: the untrimmed one's); "
            f"{d if d is not None else '?'} of {n if n is not None else '?'} texts differ in length between the two")


def unrecorded_inputs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries with a timed case (a p50) that records no inputs fingerprint: rows imported from a
    device's own benchmark tool (``edgekd bench-import``), which does not say what it was fed. Their
    latencies can be listed, never compared with rows timed on known inputs."""
    return [e for e in entries
            if any(c.get("p50_ms") is not None and not c.get("inputs_sha256") for c in e.get("cases") or [])]


def timed_by(entry: dict[str, Any]) -> str:
    """A row's name and the tool that timed it, for the notes on rows whose inputs are not recorded."""
    if entry.get("imported_from"):
        return f"{entry['name']} (imported from {entry['imported_from']})"
    return f"{entry['name']} (timed by a tool that is not recorded)"


def bench_threads(data: dict[str, Any]) -> int | None:
    """The thread count a bench was timed at: its inputs record's, else the environment's request."""
    threads = (data.get("inputs") or {}).get("threads")
    if threads is None:
        threads = ((data.get("environment") or {}).get("threads") or {}).get("requested")
    return threads


def calls_text(data: dict[str, Any]) -> str:
    """How many calls each case timed: the fixed count, or the cap and the time budget that cut it."""
    inp = data.get("inputs") or {}
    runs, warmup = inp.get("timed_calls", "?"), inp.get("warmup_calls", "?")
    budget = (data.get("config") or {}).get("time_budget_s")
    if budget:
        return (f"each case timed up to {runs} calls within a time budget of {budget:g} s after {warmup} "
                "warm-up calls, every row keeping the same first calls (as many as the fewest any row timed; "
                "the case table's runs column shows how many)")
    return f"{runs} timed calls after {warmup} warm-up calls per case"


# The note column's mark on an exported row of the pruned student (artifact.json ``source_stage: prune``),
# so it is never read as a peer of the unpruned fp32 student its Δ vs student is measured against.
PRUNED_MARK = "pruned student"


def pruned(entry: dict[str, Any]) -> bool:
    """An export folder made from the prune stage's model (results written before the bench kept
    ``source_stage`` are not marked: they do not say)."""
    return entry.get("kind") == "artifact" and entry.get("source_stage") == "prune"


def note(entry: dict[str, Any], case: dict[str, Any] | None = None) -> str:
    """The note column: the mark of a pruned export first, then the first line of the case's or entry's
    skip reason, error or note."""
    text = ""
    for source in (case or {}, entry):
        for key in ("skipped", "reason", "error", "note"):
            if source.get(key):
                text = str(source[key]).splitlines()[0]
                break
        if text:
            break
    if pruned(entry):
        return f"{PRUNED_MARK}; {text}" if text else PRUNED_MARK
    return text


def _pruned_line(data: dict[str, Any], metric: str) -> list[str]:
    """The header's word on pruned exports, where the table has any."""
    names = [str(e.get("name")) for e in data["results"] if pruned(e)]
    if not names:
        return []
    return [f"Pruned: {', '.join(names)} export the pruned student (note: {PRUNED_MARK}); their Δ vs student is "
            f"against the unpruned fp32 student's {metric} above, not a peer's.  "]


def headline_row(entry: dict[str, Any], headline: dict[str, Any]) -> dict[str, Any]:
    case = pick_case(entry, headline) or {}
    mem = entry.get("memory") or {}
    return {
        **{k: entry.get(k) for k in ("name", "kind", "target", "precision", "status", "size_bytes", "load_s",
                                      "first_inference_s", "accuracy", "ood_accuracy", "delta_vs_teacher",
                                      "delta_vs_student")},
        **{k: case.get(k) for k in ("batch", "seq", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
                                    "inputs_sha256", "plan_sha256", "tokenizer")},
        "peak_delta_mb": mem.get("peak_delta_mb"),
        "note": note(entry, case),
    }


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row.get("kind") != "torch", str(row.get("target")), str(row.get("precision")), str(row.get("name")))


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def _pp(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:+.1f} pp"


def markdown(data: dict[str, Any]) -> str:
    prof, head = data["profile"], data["headline"]
    rows = sorted((headline_row(e, head) for e in data["results"]), key=_sort_key)
    fp = same_inputs(rows, f"the bench table of {data.get('run')}")
    seq = {None: "one shared length", "real": "real lengths"}.get(head.get("seq"), f"sequence {head.get('seq')}")
    env = data.get("environment") or {}
    cpu = (env.get("cpu") or {}).get("model") or prof.get("processor")
    ref = data.get("reference") or {}
    metric = METRIC_LABELS.get(data.get("metric", "accuracy"), data.get("metric", "accuracy"))
    ood = data.get("ood") or {}
    ood_txt = (f"{ood['dataset']} ({ood.get('examples')} texts, not movie reviews)" if ood.get("dataset")
               else "no out-of-domain set (eval.ood_dataset)")
    lines = [
        f"# Bench: {data.get('run')} on {prof['name']}",
        "",
        f"{prof.get('description', '')}  ",
        f"CPU: {cpu}; threads: {_threads_header(data)}; "
        f"batch {head['batch']}, {data.get('input') or f'sequence {seq}'}; created {data.get('created')}.  ",
        f"Reference {metric}: teacher {_num(ref.get('teacher'), '.4f')}, fp32 student {_num(ref.get('student'), '.4f')}"
        f" ({ref.get('source') or 'not available'}).  ",
        *_pruned_line(data, metric),
        *_inputs_lines(data, fp),
        *_memory_lines(data),
        *([f"Pareto plot: {data['pareto_note']}  "] if data.get("pareto_note") else []),
        f"Out-of-domain {metric}: {ood_txt}.",
        "",
        f"| model | target | precision | size MB | p50 ms | p99 ms | mean ms | items/s | {metric} | OOD {metric} "
        "| Δ vs teacher | Δ vs student | load ms | peak MB | note |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        size = r["size_bytes"] / 1e6 if r.get("size_bytes") is not None else None
        load = r["load_s"] * 1000 if r.get("load_s") is not None else None
        lines.append(
            f"| {r['name']} | {r['target']} | {r['precision']} | {_num(size, '.2f')} | {_num(r['p50_ms'], '.3f')} "
            f"| {_num(r['p99_ms'], '.3f')} | {_num(r['mean_ms'], '.3f')} | {_num(r['throughput'], '.1f')} "
            f"| {_num(r['accuracy'], '.4f')} | {_num(r.get('ood_accuracy'), '.4f')} "
            f"| {_pp(r['delta_vs_teacher'])} | {_pp(r['delta_vs_student'])} | {_num(load, '.1f')} "
            f"| {_num(r['peak_delta_mb'], '.1f')} | {r['note']} |"
        )
    all_cases = [(e, c) for e in data["results"] for c in e.get("cases") or []]
    if all_cases:
        for (b, q), group in _by_case(all_cases).items():
            same_inputs([{"name": e["name"], **c} for e, c in group], f"the case batch {b}, seq {q}")
        lines += ["", "## Every case", "",
                  "| model | batch | seq | runs | p50 ms | p90 ms | p99 ms | items/s | mean tokens | tokenizer | inputs sha256 |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
        for e, c in all_cases:
            lines.append(
                f"| {e['name']} | {c.get('batch')} | {c.get('seq')} | {c.get('runs', '—')} | {_num(c.get('p50_ms'), '.3f')} "
                f"| {_num(c.get('p90_ms'), '.3f')} | {_num(c.get('p99_ms'), '.3f')} | {_num(c.get('throughput'), '.1f')} "
                f"| {_num(c.get('mean_tokens_per_item'), '.1f')} | {c.get('tokenizer') or 'shipped'} "
                f"| {(c.get('inputs_sha256') or '—')[:12]} |"
            )
    return "\n".join(lines) + "\n"


def _inputs_lines(data: dict[str, Any], fps: dict[str | None, str]) -> list[str]:
    """The header's word on inputs. Only rows with an inputs fingerprint are said to share the bench's
    inputs; rows timed by a device's own tool on inputs it does not record are named apart, listed but
    not compared, and when no timed row has a fingerprint the plan's description is not claimed at all.
    Where rows read more than one tokenizer (a trimmed vocabulary: the PyTorch teacher and student read the
    untrimmed one's ids), the header says they were fed the same texts, each its own tokenizer's ids."""
    inp = data.get("inputs") or {}
    blind = unrecorded_inputs(data["results"])
    who = "; ".join(timed_by(e) for e in blind)
    calls = f"{calls_text(data)}{_rounds_text(inp)}"
    if blind and not fps:
        return [f"Inputs: not recorded. Timed by a device's own benchmark tool on inputs it does not record, at "
                f"the shapes in the case table: {who}. Their latencies are listed as the tool reported them, not "
                "compared with rows timed on known inputs.  "]
    if len(fps) > 1:
        same = ("one plan of texts for every row" + (" with an inputs sha256" if blind else "")
                + ", one set of arrays per tokenizer")
    else:
        same = "the same for every row" if not blind else "the same for every row with an inputs sha256"
    tokens = tokenizers_text(inp.get("tokenizers"))
    lines = [f"Inputs ({same}): {inp.get('description', 'not recorded')}; {inp.get('source', '?')} test examples, "
             f"{calls}; inputs sha256 {fingerprints_text(fps)}{'; ' + tokens if tokens else ''}.  "]
    if (inp.get("tokenizers") or {}).get("original", {}).get("how"):
        lines.append(f"Untrimmed models' inputs: {inp['tokenizers']['original']['how']}.  ")
    if blind:
        lines.append(f"Not compared: timed by a device's own benchmark tool on inputs it does not record, at the "
                     f"shapes in the case table: {who}. Their latencies are listed, not compared with the rows "
                     "timed on the inputs above.  ")
    return lines


def _memory_lines(data: dict[str, Any]) -> list[str]:
    """What the peak MB column covers: loading and timing, the same work in every row, read before any
    scoring; rows of results written before that (peak read after scoring, which differs between rows)
    are named as not comparable."""
    rows = [e for e in data["results"] if (e.get("memory") or {}).get("peak_delta_mb") is not None]
    if not rows:
        return []
    older = [str(e.get("name")) for e in rows if (e.get("memory") or {}).get("peak_covers") != PEAK_COVERS]
    if older:
        return [f"Peak MB of {', '.join(older)}: read after scoring, which differs between rows (batches of "
                "bench.eval_batch_size, one text per call, or none), so not comparable between rows: re-run "
                "`edgekd bench` for figures over the same work.  "]
    return ["Peak MB: each measuring process's peak resident memory above its level before loading, over "
            "loading and timing (the first round's warm-up and timed calls, the same in every row), read before "
            "any scoring (which differs between rows).  "]


def _by_case(pairs: list[tuple[dict, dict]]) -> dict[tuple, list[tuple[dict, dict]]]:
    out: dict[tuple, list[tuple[dict, dict]]] = {}
    for e, c in pairs:
        out.setdefault((c.get("batch"), c.get("seq")), []).append((e, c))
    return out


def csv_text(data: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for e in data["results"]:
        base = {k: e.get(k) for k in CSV_FIELDS}
        base.update({k: (e.get("memory") or {}).get(k) for k in ("load_delta_mb", "peak_delta_mb")})
        for case in e.get("cases") or [{}]:
            w.writerow({**base, **{k: v for k, v in case.items() if k in CSV_FIELDS}, "note": note(e, case)})
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_rows(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The headline ``rows`` a Pareto plot may put side by side (a p50 and an accuracy each), and a note
    naming those left out: when some rows record an inputs fingerprint, the rows that record none (imported
    from a device's own tool) were not timed on the same inputs. ``pareto.png`` and the HTML page's chart
    both plot these."""
    rows = [r for r in rows if r.get("p50_ms") is not None and r.get("accuracy") is not None]
    left_out = [r["name"] for r in rows if not r.get("inputs_sha256")]
    if not left_out or len(left_out) == len(rows):
        return rows, None
    by_name = {e.get("name"): e for e in results}
    who = "; ".join(timed_by(by_name.get(n) or {"name": n}) for n in left_out)
    return ([r for r in rows if r.get("inputs_sha256")],
            f"left out {who}: timed on inputs that are not recorded, so not comparable with the plotted rows.")


def pareto_figure(data: dict[str, Any]) -> tuple[Any, list[Any]] | tuple[None, str]:
    """(figure, its point labels), or (None, why no plot). A bare Figure: no pyplot global state.

    When some points record an inputs fingerprint, the points that record none (rows imported from a
    device's own benchmark tool) are left out: their latencies were not timed on the same inputs.
    ``data["pareto_note"]`` then names them (results.json and the table carry it); otherwise it is removed."""
    rows = [headline_row(e, data["headline"]) for e in data["results"]]
    data.pop("pareto_note", None)
    rows, note = pareto_rows(rows, data["results"])
    if note:
        data["pareto_note"] = note
    if not rows:
        return None, "no model has both a p50 latency and an accuracy (pass eval inputs, labels and metric_fn)"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(r["p50_ms"], r["accuracy"]) for r in rows]
    metric = METRIC_LABELS.get(data.get("metric", "accuracy"), data.get("metric", "accuracy"))
    front = pareto_front(pts)
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", label="measured", zorder=3)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.plot(fx, fy, "o-", color="tab:red", drawstyle="steps-post", label="Pareto front", zorder=3)
    ref = data.get("reference") or {}
    if ref.get("teacher") is not None:
        ax.axhline(ref["teacher"], color="tab:blue", linestyle="--", linewidth=1, label=f"teacher {metric}")
    ax.set_xlabel(f"p50 latency (ms), batch {data['headline']['batch']}")
    ax.set_ylabel(metric)
    ax.set_title(f"{data.get('run')} on {data['profile']['name']}")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.2)  # room for the labels around the outermost points
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    labels = place_labels(fig, ax, pts, [str(r["name"]) for r in rows])
    return fig, labels


# Where a label may go, in points from its point: the nearest ring first, eight directions per ring.
_RINGS = (6, 14, 24, 36, 50, 66, 84, 104, 126)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def text_box(label: Any, renderer: Any) -> Any:
    """The display box of a label's text alone (an annotation's own extent includes its leader line)."""
    from matplotlib.text import Text

    label.update_positions(renderer)
    return Text.get_window_extent(label, renderer)


def place_labels(fig: Any, ax: Any, pts: list[tuple[float, float]], names: list[str]) -> list[Any]:
    """Name every point where its label overlaps no other label, no point and the legend: the
    nearest free spot around it, joined to it by a thin line when it sits away from the point.
    Crowded points (a float and an int8 model a few microseconds apart) stay readable."""
    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    marks = [ax.transData.transform(p) for p in pts]
    pad = 5.0  # pixels around a marker no label may cover

    def free(box) -> bool:
        if box.x0 < area.x0 or box.x1 > area.x1 or box.y0 < area.y0 or box.y1 > area.y1:
            return False
        if any(box.overlaps(t) for t in taken):
            return False
        return not any(box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad for mx, my in marks)

    labels = []
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1]))
    for i in order:
        chosen = None
        for ring in _RINGS:
            for dx, dy in _DIRECTIONS:
                text = ax.annotate(
                    names[i], pts[i], textcoords="offset points", xytext=(dx * ring, dy * ring), fontsize=8,
                    ha={1: "left", -1: "right", 0: "center"}[dx], va={1: "bottom", -1: "top", 0: "center"}[dy],
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6} if ring > _RINGS[0] else None,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                )
                box = text_box(text, renderer)
                if free(box):
                    chosen = (text, box)
                    break
                text.remove()
            if chosen:
                break
        if chosen is None:  # no free spot anywhere near: beside the point, as before
            text = ax.annotate(names[i], pts[i], textcoords="offset points", xytext=(4, 4), fontsize=8)
            chosen = (text, text_box(text, renderer))
        taken.append(chosen[1])
        labels.append(chosen[0])
    return labels


def pareto_png(data: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """(png bytes, None), or (None, why no plot)."""
    fig, labels = pareto_figure(data)
    if fig is None:
        return None, labels
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue(), None


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_bench_dir(out: Path, data: dict[str, Any], extra: dict[str, bytes] | None = None,
                    keep_existing: bool = False) -> None:
    """Write results.json/csv, table.md, pareto.png (and ``extra`` files) as one atomic folder swap."""
    png, why = pareto_png(data)
    data["pareto"] = "pareto.png" if png else f"not drawn: {why}"
    with atomic_dir(out) as tmp:
        if keep_existing and out.is_dir():
            shutil.copytree(out, tmp, dirs_exist_ok=True)
            (tmp / "pareto.png").unlink(missing_ok=True)
        for rel, blob in (extra or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(blob)
        (tmp / "results.json").write_text(json.dumps(_finite(data), indent=2, default=str))
        (tmp / "results.csv").write_text(csv_text(data))
        (tmp / "table.md").write_text(markdown(data))
        if png:
            (tmp / "pareto.png").write_bytes(png)


# --- reading back and comparing ---------------------------------------------------------------------


def load_results(where: str | Path, profile: str | None = None) -> dict[str, Any]:
    """results.json from a results file, a bench/<profile> folder, or a run folder (+ profile).
    ``_label`` names it as "<run folder>/<profile>" for side-by-side reports."""
    p = Path(where)
    if p.is_file():
        data, run = json.loads(p.read_text()), p.resolve().parent.parent.parent
    elif (p / "results.json").is_file():
        data, run = json.loads((p / "results.json").read_text()), p.resolve().parent.parent
    else:
        bench = p / "bench"
        have = sorted(d.name for d in bench.iterdir() if (d / "results.json").is_file()) if bench.is_dir() else []
        if profile is None:
            if len(have) == 1:
                profile = have[0]
            elif "local" in have:
                profile = "local"
            else:
                raise StageError(f"{p} holds bench results for {have or 'no profile'}; name one with --profile.")
        if profile not in have:
            raise StageError(
                f"No bench results for profile '{profile}' in {p} (found: {', '.join(have) or 'none'}). "
                f"Run `edgekd bench {p} --profile {profile}` first."
            )
        data, run = json.loads((bench / profile / "results.json").read_text()), p.resolve()
    data["_label"] = f"{run.name or data.get('run')}/{data['profile']['name']}"
    return data


def report(run_dir: str | Path, compare: list[str | Path] | None = None, profile: str | None = None) -> str:
    """The bench table of ``run_dir``; with ``compare`` (other run folders, bench folders, or profile
    names measured on the same run), the p50 latency and accuracy of each side by side."""
    base = load_results(run_dir, profile)
    if not compare:
        return markdown(base)
    sides = [base]
    for other in compare:
        if Path(other).exists():
            sides.append(load_results(other, profile))
        else:
            sides.append(load_results(run_dir, str(other)))
    labels = [s["_label"] for s in sides]
    labels = [lab if labels.count(lab) == 1 else f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    check_same_threads(sides, labels)
    rows_by_side = [{e["name"]: headline_row(e, s["headline"]) for e in s["results"]} for s in sides]
    same_inputs([{**r, "name": f"{lab}:{r['name']}"} for lab, rows in zip(labels, rows_by_side, strict=True)
                       for r in rows.values()], "the comparison")
    names = sorted({n for rows in rows_by_side for n in rows},
                   key=lambda n: _sort_key(next(r[n] for r in rows_by_side if n in r)))
    head = "| model | " + " | ".join(f"{lab} p50 ms | {lab} acc" for lab in labels)
    head += " | " + " | ".join(f"p50 × vs {labels[0]} ({lab})" for lab in labels[1:]) + " |"
    sep = "|---|" + "--:|--:|" * len(labels) + "--:|" * (len(labels) - 1)
    lines = [f"# Bench comparison: {' vs '.join(labels)}", ""]
    lines += [_side_line(lab, s, rows) for lab, s, rows in zip(labels, sides, rows_by_side, strict=True)]
    profiles = [s["profile"]["name"] for s in sides]
    if len(set(profiles)) > 1:
        threads = ", ".join(f"{p} at {_threads_text(bench_threads(s))}" for p, s in zip(profiles, sides, strict=True))
        lines += ["", f"The p50 ratios compare devices, each timed at its own profile's threads ({threads})."]
    lines += ["", head, sep]
    entries = [{e["name"]: e for e in s["results"]} for s in sides]
    unrecorded: list[str] = []
    mixed: list[str] = []  # rows pruned on some sides and not on others
    for n in names:
        cells, p50s, prints = [], [], []
        marks = [pruned(side[n]) if n in side else None for side in entries]
        for rows, mark in zip(rows_by_side, marks, strict=True):
            r = rows.get(n, {})
            p50s.append(r.get("p50_ms"))
            prints.append(r.get("inputs_sha256"))
            cells += [_num(r.get("p50_ms"), ".3f") + (f" ({PRUNED_MARK})" if mark else ""),
                      _num(r.get("accuracy"), ".4f")]
        if len({m for m in marks if m is not None}) > 1:
            mixed.append(n)
        ratios = []
        for i, p in enumerate(p50s[1:], 1):
            if p and p50s[0] and not (prints[i] and prints[0]):
                ratios.append("—")
                blind = [f"{timed_by(entries[j][n])} on {labels[j]}" for j in (0, i) if not prints[j]]
                unrecorded += [b for b in blind if b not in unrecorded]
            else:
                ratios.append(_num(p / p50s[0], ".2f") + "×" if p and p50s[0] else "—")
        lines.append(f"| {n} | " + " | ".join(cells + ratios) + " |")
    if unrecorded:
        lines += ["", f"No p50 ratio (—) where a side was timed on inputs that are not recorded: "
                      f"{'; '.join(unrecorded)}. Those latencies are listed, not compared."]
    if mixed:
        lines += ["", f"Pruned on one side, not on another: {', '.join(mixed)}. Their ratios compare an export of "
                      f"the pruned student with one of the unpruned student, not the same model on two sides."]
    return "\n".join(lines) + "\n"


def _threads_header(data: dict[str, Any]) -> str:
    """The thread count the rows ran with, and where it came from where the record says (the profile's
    threads, its cores, all the device's cores, bench.threads)."""
    threads = _first_known(bench_threads(data), data["profile"].get("threads"))
    source = (data.get("inputs") or {}).get("threads_from")
    if threads is None:
        return source or "not recorded"
    return f"{threads} ({source})" if source else str(threads)


def _first_known(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _threads_text(threads: int | None) -> str:
    return "threads not recorded" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"


def _side_line(label: str, data: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    """One side of a comparison: its profile, CPU, threads and inputs, so a reader sees what each
    column was timed on."""
    env = data.get("environment") or {}
    cpu = (env.get("cpu") or {}).get("model") or data["profile"].get("processor") or "not recorded"
    fps = same_inputs(list(rows.values()), f"the bench of {label}")
    inp = data.get("inputs") or {}
    marked = [str(e.get("name")) for e in data["results"] if pruned(e)]
    return (f"- {label}: profile {data['profile']['name']}; CPU {cpu}; {_threads_text(bench_threads(data))}; "
            f"inputs sha256 {fingerprints_text(fps)} "
            f"({inp.get('description') or 'inputs not described'})"
            + (f"; {', '.join(marked)}: exports of the pruned student" if marked else "") + ".")


def check_same_threads(sides: list[dict[str, Any]], labels: list[str]) -> None:
    """Refuse to compare benches of one profile (one device) timed at different thread counts: the
    ratio would measure the threads, not the models or the runs. Sides of different profiles may
    differ: there the ratio compares devices, each at its own profile's threads."""
    by_profile: dict[str, list[tuple[str, int | None]]] = {}
    for lab, side in zip(labels, sides, strict=True):
        by_profile.setdefault(side["profile"]["name"], []).append((lab, bench_threads(side)))
    for prof, group in by_profile.items():
        if len({t for _, t in group if t is not None}) > 1:
            detail = ", ".join(f"{lab} at {_threads_text(t)}" for lab, t in group)
            raise StageError(
                f"The comparison would put benches of profile '{prof}' timed at different thread counts side by "
                f"side ({detail}). On one device the p50 ratio would measure the threads, not the models: re-run "
                f"`edgekd bench <run folder> --profile {prof} --set bench.threads=N` so every side uses the same N."
            )
