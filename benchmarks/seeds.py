"""The whole pipeline over several seeds, each run measured by compare_tools, reported as mean ± sd.

    python benchmarks/seeds.py [RECIPE] [--seeds 42 43 44] [--set key=value ...] [--runs N]
                               [--threads T] [--batch-sizes 1 8] [--no-memory] [--out DIR]
                               [--no-run [--reuse]] [--pipeline-only]

For each seed: ``edgekd run RECIPE --set seed=S --set name=<name>-seed<S>`` (a stage unchanged since
an earlier run of that seed is skipped; ``--no-run`` measures existing run folders only), then
``compare_tools`` on that run folder (every model timed on the same texts, each on its own tokenizer's
ids, in its own process, in rounds), with ``--artifact`` set to the folder the run ships (the quantize stage's recommendation,
as the run's summary and ``edgekd serve`` name it), so the figures and the verdict are the shipped
artifact's, never a folder compare_tools would pick by its own rule. ``--no-run --reuse`` reads each
run's ``compare/compare.json`` instead of measuring again (the shipped folder's row in it). The
figures of the seeds are then put side by side: for each, the mean, the sample standard deviation,
the range, and for each bar of the compression issue how many seeds meet it. The table says how each seed's
comparison was timed (rounds, threads, calls per batch size) and notes seeds timed in different numbers of
rounds or calls; seeds timed on different threads or inputs (or any other setting that changes what was timed
or scored: warm-up, examples, out-of-domain set, ...; the ablation is batch 1's) are refused, never averaged.
With ``--no-run`` nothing runs, so each ``--set`` must match the run's saved recipe.yaml, else it is refused.
The bars:

- the shipped artifact at least 1.5x faster at p50,
  batch 1, than every usual path on the distilled student (Optimum int8, OpenVINO NNCF int8, torchao
  compiled) and at least as accurate as each (test);
- within 0.5 points of the fp32 distilled student; at least 15x faster than the fp32 teacher in
  PyTorch; at most 8 MB; out of domain at least 97% of the student's accuracy; the pipeline's
  recorded stage time at most 20 minutes.

``--pipeline-only`` skips compare_tools and reads each seed's figures from its own run folder: the
fp32 teacher and student from the eval stage, the shipped artifact (the quantize stage's folder) as the
bench scored and timed it, beside the bench's PyTorch teacher and student; no usual path is built, so no
speed-up or margin against one is shown and the table says so. It is the cheap way to see how the
accuracy figures move between seeds; the bars against the usual paths need the full form.

Writes ``seeds.md`` and ``seeds.json`` to ``--out`` (default ``runs/<name>-seeds/``; over other seeds than
42 43 44, ``runs/<name>-seeds-45-46/`` and so on) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import _compare_report as report

from edgekd.errors import EdgeKDError

# (key, what it is, format, the bar: (comparison, value) or None)
FIGURES: list[tuple[str, str, str, tuple[str, float] | None]] = [
    ("student_accuracy", "fp32 distilled student, test accuracy %", ".2f", None),
    ("shipped_accuracy", "shipped artifact, test accuracy %", ".2f", None),
    ("vs_student_pp", "shipped minus fp32 student, points", "+.2f", (">=", -0.5)),
    ("shipped_p50_ms", "shipped artifact, p50 ms (batch 1)", ".3f", None),
    ("vs_teacher", "speed-up vs fp32 teacher in PyTorch (batch 1)", ".1f", (">=", 15.0)),
    ("shipped_mb", "shipped artifact, MB (10^6 bytes)", ".2f", ("<=", 8.0)),
    ("ood_kept_pct", "out of domain, % of the student's accuracy", ".1f", (">=", 97.0)),
    ("pipeline_min", "pipeline stage time, minutes", ".1f", ("<=", 20.0)),
]
USUAL_LABELS = {"optimum-onnx-int8": "Optimum int8", "openvino-nncf-int8": "OpenVINO NNCF int8",
                "torchao-int8-compiled": "torchao compiled", "torchao-int8": "torchao eager"}


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def shipped_row(data: dict[str, Any]) -> dict[str, Any]:
    """The row of the export folder the run ships (``data["shipped"]``, recorded by :func:`main`), else
    the row compare_tools chose (``best``). A shipped folder without a row in the comparison is an
    error, never a seed of empty figures."""
    rows = data.get("rows") or []
    if data.get("shipped"):
        row = next((r for r in rows if r["name"] == f"edgekd-{data['shipped']}"), None)
        if row is None:
            raise EdgeKDError(f"the run ships {data['shipped']}, but its compare_tools results have no "
                              f"edgekd-{data['shipped']} row: measure it again (without --reuse).")
        return row
    return next((r for r in rows if r.get("best")), None) or {}


# The usual paths whose bars every seed must show (compare_tools' default paths): a path that failed, was
# skipped or is not installed in a seed gives that seed no figure, which counts as not met, never as absent.
REQUIRED_PATHS = ("optimum-onnx-int8", "openvino-nncf-int8", "torchao-int8-compiled")


def seed_figures(data: dict[str, Any], batch: int = 1) -> dict[str, float | None]:
    """One seed's figures from its compare.json: the shipped artifact against the student, the
    teacher and each usual path, all timed in that one compare run. The speed-up and margin against
    each of :data:`REQUIRED_PATHS` are always there (None where the path did not run); another usual
    path (torchao eager) only where it ran. A ``--pipeline-only`` record built no usual path: none."""
    rows = {r["name"]: r for r in data.get("rows") or []}
    best = shipped_row(data)
    student, teacher = rows.get("student-fp32") or {}, rows.get(report.TEACHER) or {}
    acc_b, acc_s = best.get("accuracy"), student.get("accuracy")
    p_b = report.p50(best, batch)
    out: dict[str, float | None] = {
        "student_accuracy": _pct(acc_s),
        "shipped_accuracy": _pct(acc_b),
        "vs_student_pp": None if acc_b is None or acc_s is None else 100.0 * (acc_b - acc_s),
        "shipped_p50_ms": p_b,
        "vs_teacher": report._div(report.p50(teacher, batch), p_b),
        "shipped_mb": None if best.get("size_bytes") is None else best["size_bytes"] / 1e6,
        "ood_kept_pct": (None if best.get("ood_accuracy") is None or not student.get("ood_accuracy")
                         else 100.0 * best["ood_accuracy"] / student["ood_accuracy"]),
        "pipeline_min": (None if (data.get("pipeline") or {}).get("total_seconds") is None
                         else data["pipeline"]["total_seconds"] / 60.0),
    }
    for name in USUAL_LABELS:
        ref = rows.get(name)
        ran = ref is not None and ref.get("status") == "ok"
        if data.get("pipeline_only") or (not ran and name not in REQUIRED_PATHS):
            continue
        out[f"speedup:{name}"] = report._div(report.p50(ref, batch), p_b) if ran else None
        out[f"margin:{name}"] = (None if not ran or acc_b is None or ref.get("accuracy") is None
                                 else 100.0 * (acc_b - ref["accuracy"]))
    return out


def exact_bars(data: dict[str, Any]) -> dict[str, bool | None]:
    """The accuracy bars of one seed decided on counts of texts, as compare_tools decides them
    (``_compare_report.within_points`` and ``keeps_share``): the float figures only display. None where a
    figure is missing."""
    rows = {r["name"]: r for r in data.get("rows") or []}
    best, student = shipped_row(data), rows.get("student-fp32") or {}
    acc_b, acc_s = report.row_share(best), report.row_share(student)
    ood_b, ood_s = report.row_share(best, "ood_accuracy"), report.row_share(student, "ood_accuracy")
    return {"vs_student_pp": None if acc_b is None or acc_s is None else report.within_points(acc_b, acc_s),
            "ood_kept_pct": None if ood_b is None or not ood_s else report.keeps_share(ood_b, ood_s)}


def _dotted(tree: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


# --set keys that choose which run folder is read (its existence is checked), not how the run was made
_LOCATING = ("name", "output_dir")


def check_saved_recipe(run_dir: Path, recipe: Any, sets: list[str]) -> None:
    """With ``--no-run`` nothing is run, so each ``--set key=value`` must be what the run folder's saved
    ``recipe.yaml`` holds: a run made with other values is refused (naming the run, the key and both
    values), never measured as if it had them."""
    from edgekd.recipe import load_recipe

    keys = [item.split("=", 1)[0].strip() for item in sets if item.split("=", 1)[0].strip() not in _LOCATING]
    if not keys:
        return
    saved_file = Path(run_dir) / "recipe.yaml"
    if not saved_file.is_file():
        raise EdgeKDError(f"--no-run with --set {', '.join(keys)}: {run_dir} has no recipe.yaml to check them "
                          "against: run it (drop --no-run) or drop --set.")
    wanted, saved = recipe.model_dump(mode="json"), load_recipe(saved_file).model_dump(mode="json")
    for key in keys:
        found, want = _dotted(wanted, key)
        if not found:
            raise EdgeKDError(f"--set {key}: not a recipe setting seeds.py can check against {saved_file}: drop it.")
        _, got = _dotted(saved, key)
        if got != want:
            raise EdgeKDError(f"--no-run: {run_dir} was made with {key}={json.dumps(got)} (its recipe.yaml), not "
                              f"the {json.dumps(want)} of --set {key}: run it with that value (drop --no-run) or "
                              "drop the --set.")


def shipped_folder(run_dir: Path) -> str:
    """The export folder the run ships, by the rule of the run's summary and `edgekd serve` (the quantize
    stage's recommendation, else the only export)."""
    from edgekd.report import shipped_artifact
    from edgekd.runfolder import RunFolder

    name, why = shipped_artifact(RunFolder(Path(run_dir)))
    if name is None:
        raise EdgeKDError(f"{run_dir}: no shipped artifact to compare: {why}")
    return name


def reuse_compare(run_dir: Path) -> dict[str, Any]:
    """``compare/compare.json`` of a run, refused when missing or older than the run's manifest."""
    found, manifest = Path(run_dir) / "compare" / "compare.json", Path(run_dir) / "manifest.json"
    if not found.is_file():
        raise EdgeKDError(f"--reuse: {found} does not exist: measure it (drop --reuse).")
    if manifest.is_file() and manifest.stat().st_mtime > found.stat().st_mtime:
        raise EdgeKDError(f"--reuse: {found} was written before the run last changed ({manifest}): measure "
                          "again (drop --reuse).")
    return json.loads(found.read_text())


def _bench_row(row: dict[str, Any]) -> dict[str, Any]:
    """A bench result row in compare_tools' shape: p50 per batch size at real lengths."""
    cases = {str(c["batch"]): {"p50_ms": c.get("p50_ms")} for c in row.get("cases") or []
             if c.get("seq") in ("real", None) and c.get("batch") is not None}
    return {"status": row.get("status") or "ok", "accuracy": row.get("accuracy"),
            "ood_accuracy": row.get("ood_accuracy"), "size_bytes": row.get("size_bytes"), "cases": cases}


def _bench_results(run_dir: Path, stages: dict[str, Any]) -> Path | None:
    """The bench's ``results.json``: in ``bench/<profile>/``, the profile the run's bench stage recorded;
    without that record, the one profile folder there is (several: refused, the run does not say which)."""
    profile = ((stages.get("bench") or {}).get("metrics") or {}).get("profile")
    if profile:
        found = run_dir / "bench" / str(profile) / "results.json"
        return found if found.is_file() else None
    found = sorted((run_dir / "bench").glob("*/results.json"))
    if len(found) > 1:
        raise EdgeKDError(f"{run_dir}: the manifest records no bench profile and bench/ holds several "
                          f"({', '.join(f.parent.name for f in found)}): run the bench stage again so the run says "
                          "which one it timed.")
    return found[0] if found else None


def pipeline_record(run_dir: Path, shipped: str) -> dict[str, Any]:
    """One seed's figures from the pipeline's own records (``--pipeline-only``), shaped like compare_tools'
    result so that :func:`seed_figures` reads them alike: the teacher's and the fp32 student's test and
    out-of-domain accuracy from the eval stage, their p50 from the bench's PyTorch rows; the shipped
    artifact (export folder ``shipped``) as the bench scored and timed it (``bench/<profile>/results.json``, with
    how it timed them, for :func:`timing_over_seeds`), else the quantize stage's test
    figure; the recorded stage time. Rows the run did not measure stay absent."""
    manifest_file = run_dir / "manifest.json"
    if not manifest_file.is_file():
        raise EdgeKDError(f"{run_dir} has no manifest.json: run the pipeline there first.")
    manifest = json.loads(manifest_file.read_text())
    stages = manifest.get("stages") or {}
    ev = (stages.get("eval") or {}).get("metrics") or {}
    if "student" not in ev:
        raise EdgeKDError(f"{run_dir}: no eval stage recorded, so there is no fp32 student to compare with; "
                          "run the pipeline with its eval stage.")
    bench_file = _bench_results(run_dir, stages)
    bench_data = json.loads(bench_file.read_text()) if bench_file is not None else {}
    bench = {r["name"]: r for r in bench_data.get("results") or []}
    rows = []
    for name, key in ((report.TEACHER, "teacher"), ("student-fp32", "student")):
        timed = _bench_row(bench[f"pytorch-{key}"]) if f"pytorch-{key}" in bench else {"cases": {}}
        rows.append({**timed, "name": name, "accuracy": ev.get(key, {}).get("accuracy"),
                     "ood_accuracy": ev.get(key, {}).get("ood_accuracy")})
    if shipped in bench:
        rows.append({**_bench_row(bench[shipped]), "name": f"edgekd-{shipped}", "best": True})
    else:
        quantized = ((stages.get("quantize") or {}).get("metrics") or {}).get("test", {}).get("quantized") or {}
        meta_file = run_dir / "export" / shipped / "artifact.json"
        size = json.loads(meta_file.read_text()).get("size_bytes") if meta_file.is_file() else None
        rows.append({"name": f"edgekd-{shipped}", "status": "ok", "best": True, "accuracy": quantized.get("accuracy"),
                     "ood_accuracy": None, "size_bytes": size, "cases": {}})
    # how the bench timed and scored them, which timing_over_seeds requires alike in every seed
    timed = ({"profile": bench_file.parent.name, "created": bench_data.get("created"),
              **{k: bench_data.get(k) for k in ("inputs", "config", "ood")}} if bench_file is not None else None)
    return {"rows": rows, "pipeline": report.pipeline_time(manifest), "pipeline_only": True, "bench": timed,
            "verdict": {"summary": f"pipeline only: {shipped} against the run's own eval and bench; the usual "
                                   "paths were not built"}}


def _ood_set(ood: dict[str, Any] | None) -> dict[str, Any] | None:
    """Which out-of-domain set was scored (not how it was chosen): None where none was."""
    ood = ood or {}
    return {k: ood.get(k) for k in ("dataset", "examples", "sha256") if k in ood} if ood.get("dataset") else None


def ablation_batch(data: dict[str, Any]) -> int | None:
    """The batch size compare_tools' ablation p50s were read at: recorded since compare_tools read them at
    batch 1 whenever batch 1 was timed; before, the first of ``--batch-sizes``. None without an ablation."""
    if not data.get("ablation"):
        return None
    settings = data.get("settings") or {}
    if settings.get("ablation_batch") is not None:
        return settings["ablation_batch"]
    return (settings.get("batch_sizes") or [None])[0]


def timing_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """How one seed's comparison was timed and scored: compare_tools' ``settings`` and ``timing``, or for
    ``--pipeline-only`` the bench's inputs record (``bench``); None for a record that timed nothing of its
    own. ``alike`` holds every setting that changes what was timed or scored, which :func:`timing_over_seeds`
    requires to be the same in every seed."""
    if data.get("pipeline_only"):
        bench = data.get("bench")
        if not bench:
            return None
        inputs, config = bench.get("inputs") or {}, bench.get("config") or {}
        return {"rounds": inputs.get("rounds"), "threads": inputs.get("threads"), "calls": inputs.get("timed_calls"),
                "batch_sizes": config.get("batch_sizes"), "inputs": inputs.get("description"),
                "created": bench.get("created"), "source": f"bench/{bench.get('profile')}",
                "alike": {"threads": inputs.get("threads"), "inputs": inputs.get("description"),
                          "input source": inputs.get("source"), "warm-up calls": inputs.get("warmup_calls"),
                          "sequence lengths": config.get("seq_lengths"),
                          "test examples scored": config.get("eval_examples"),
                          "out-of-domain set": _ood_set(bench.get("ood"))}}
    if "settings" not in data:
        return None
    settings, timing = data.get("settings") or {}, data.get("timing") or {}
    return {"rounds": timing.get("rounds"), "threads": settings.get("threads"), "calls": settings.get("runs"),
            "batch_sizes": settings.get("batch_sizes"), "inputs": settings.get("inputs"),
            "created": data.get("created"),
            "alike": {"threads": settings.get("threads"), "inputs": settings.get("inputs"),
                      "scoring": settings.get("scoring"), "warm-up calls": settings.get("warmup"),
                      "test examples scored (--eval-limit)": settings.get("eval_examples"),
                      "test examples": settings.get("test_examples"),
                      "validation examples": settings.get("validation_examples"),
                      "seed of the timing order": settings.get("seed"),
                      "NNCF calibration texts": settings.get("calibration_texts"),
                      "Optimum config": settings.get("optimum_isa"),
                      "out-of-domain set (--ood)": _ood_set(data.get("ood")),
                      "timing processes (--one-process)": timing.get("process"),
                      "ablation batch size": ablation_batch(data)}}


# Every setting in a timing record's ``alike`` must be the same in every seed's comparison before their figures
# are averaged: a mean over seeds timed on other threads, inputs, warm-up, test or out-of-domain examples (...)
# would pool different quantities. (Other batch sizes timed beside batch 1 change no figure the table reads: it
# reads batch 1, the ablation included; fewer rounds or calls change a figure's precision, not what it measures,
# and get a note.)


def _batch1_calls(t: dict[str, Any]) -> Any:
    calls = t.get("calls")
    return calls.get("1") if isinstance(calls, dict) else calls


def _shown(v: Any) -> str:
    return "not recorded" if v is None else json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def timing_over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each seed's timing (:func:`timing_of`) and, when their round counts or their timed calls at batch 1
    differ, a note saying so: each seed's rows were timed alike within its own comparison, but fewer rounds
    or calls give a wider spread. Seeds whose comparisons differ in any setting of ``alike`` (threads,
    inputs, warm-up, examples, out-of-domain set, ...), a comparison without batch 1 and an ablation read at
    another batch size than 1 are refused (``EdgeKDError``), never averaged."""
    timing = {s: timing_of(d) for s, d in sorted(per_seed.items())}
    timed = {s: t for s, t in timing.items() if t is not None}
    again = ("measure them again with the same options" + ("" if any(t.get("source") for t in timed.values())
                                                           else " (without --reuse)"))
    for s, t in timed.items():
        if t["batch_sizes"] is not None and 1 not in t["batch_sizes"]:
            raise EdgeKDError(f"seed {s}'s comparison timed batch sizes {t['batch_sizes']} without batch 1, which "
                              f"every figure of the table reads: {again}, batch 1 included")
        got = t["alike"].get("ablation batch size")
        if got is not None and got != 1:
            raise EdgeKDError(f"seed {s}'s compare_tools ablation was read at batch {got} (the first of its "
                              f"--batch-sizes {t['batch_sizes']}), but the table's ablation is batch 1: {again}")
    keys = list(dict.fromkeys(k for t in timed.values() for k in t["alike"]))
    for key in keys:
        values = {s: t["alike"].get(key) for s, t in timed.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            each = ", ".join(f"seed {s}: {_shown(v)}" for s, v in values.items())
            raise EdgeKDError(f"the seeds' comparisons were not timed alike ({key}: {each}); a "
                              f"mean over them would pool different measurements: {again}")
    unlike = []
    for what, of in (("timing rounds", lambda t: t["rounds"]), ("timed calls at batch 1", _batch1_calls)):
        values = {s: of(t) for s, t in timed.items()}
        if len(set(map(str, values.values()))) > 1:
            unlike.append(f"{what} (" + ", ".join(f"seed {s}: {'not recorded' if v is None else v}"
                                                   for s, v in values.items()) + ")")
    note = None
    if unlike:
        note = ("the seeds' comparisons took different numbers of " + " and ".join(unlike)
                + ": within each seed every row was timed alike, but a seed timed in fewer rounds or calls "
                "carries a wider spread")
    return {"per_seed": timing, "note": note}


def _stats(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None and math.isfinite(v)]
    if not got:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(got) / len(got)
    sd = math.sqrt(sum((v - mean) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else None
    return {"n": len(got), "mean": mean, "sd": sd, "min": min(got), "max": max(got)}


def _meets(value: float | None, bar: tuple[str, float]) -> bool | None:
    if value is None:
        return None
    op, limit = bar
    return value >= limit if op == ">=" else value <= limit


def _verdict_met(data: dict[str, Any]) -> bool:
    """compare_tools' own verdict on this seed met, and about the shipped folder (a verdict on another
    pick says nothing about what ships)."""
    return bool((data.get("verdict") or {}).get("met")) and _verdict_is_shipped(data)


def aggregate(per_seed: dict[int, dict[str, Any]], target_speedup: float = 1.5) -> dict[str, Any]:
    """Mean ± sd of every figure over the seeds, and per bar how many seeds meet it. A seed whose
    figure is missing counts as not meeting the bar (it was not shown): the bars against each usual path
    of :data:`REQUIRED_PATHS` are there whether or not it ran. The accuracy bars are decided on counts
    (:func:`exact_bars`). All bars are met only when every bar is met in every seed and every seed's own
    compare_tools verdict is met. Seeds whose comparisons were timed on different threads or inputs raise
    ``EdgeKDError`` (:func:`timing_over_seeds`)."""
    figs = {s: seed_figures(d) for s, d in per_seed.items()}
    exact = {s: exact_bars(d) for s, d in per_seed.items()}
    seeds = sorted(figs)
    rows = []
    bars = list(FIGURES)
    keys = sorted({k for f in figs.values() for k in f if ":" in k})
    for k in keys:
        kind, name = k.split(":", 1)
        label = USUAL_LABELS[name]
        bars.append((k, f"speed-up vs {label} (batch 1)" if kind == "speedup" else
                     f"accuracy minus {label}'s, points", ".2f" if kind == "speedup" else "+.2f",
                     (">=", target_speedup) if kind == "speedup" else (">=", 0.0)))
    for key, what, fmt, bar in bars:
        values = [figs[s].get(key) for s in seeds]
        row = {"key": key, "what": what, "format": fmt, "values": dict(zip(seeds, values, strict=True)),
               **_stats(values)}
        if bar is not None:
            met = [exact[s][key] if key in exact[s] else _meets(v, bar) for s, v in zip(seeds, values, strict=True)]
            row.update(bar=f"{bar[0]} {bar[1]:g}", limit=bar[1], seeds_meeting=sum(bool(m) for m in met),
                       all_met=all(met))
        rows.append(row)
    barred = [r for r in rows if "bar" in r]
    pipeline_only = any(d.get("pipeline_only") for d in per_seed.values())
    verdicts_met = {s: _verdict_met(per_seed[s]) for s in seeds}
    # compare_tools' text-by-text comparison of the shipped artifact with each path (when it recorded one)
    paired: dict[str, dict[int, Any]] = {}
    for s in seeds:
        for name, pr in ((per_seed[s].get("paired") or {}).items() if _verdict_is_shipped(per_seed[s]) else ()):
            paired.setdefault(name, {})[s] = pr
    return {"seeds": seeds, "rows": rows, "pipeline_only": pipeline_only, "paired": paired,
            "averaged": _seed_averaged(per_seed, seeds, list(paired)),
            "ablation": ablation_over_seeds(per_seed), "timing": timing_over_seeds(per_seed),
            "all_met": (bool(barred) and all(r["all_met"] for r in barred) and not pipeline_only
                        and all(verdicts_met.values())),
            "verdicts_met": verdicts_met,
            "verdicts": {s: _verdict(per_seed[s]) for s in seeds}}


ABLATION_FIGURES = ("p50_before_ms", "p50_after_ms", "speedup", "accuracy_delta", "val_accuracy_delta",
                    "ood_accuracy_delta", "size_ratio")


def ablation_over_seeds(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """compare_tools' ablation rows (what each edgekd step adds on its own) over the seeds: per step (its
    name and what it changes: the same step can apply to two folders), in the order the steps first
    appear, each figure's value per seed and its mean ± sd (a step a seed's comparison has no row for is
    missing from that seed, and its ``n`` says over how many seeds)."""
    steps: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sorted(per_seed):
        for a in per_seed[s].get("ablation") or []:
            key = (a["step"], a.get("what", ""))
            step = steps.setdefault(key, {"step": a["step"], "what": a.get("what", ""), "seeds": {}})
            step["seeds"][s] = {k: a.get(k) for k in ABLATION_FIGURES}
    out = []
    for step in steps.values():
        step["stats"] = {k: _stats([v[k] for v in step["seeds"].values()]) for k in ABLATION_FIGURES}
        out.append(step)
    return out


def _ablation_markdown(ablation: list[dict[str, Any]], n_seeds: int) -> list[str]:
    def mean(step: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        st = step["stats"][key]
        if not st["n"]:
            return "—"
        sd = "" if st["sd"] is None else f" ± {st['sd'] * scale:{fmt.lstrip('+')}}"
        return f"{st['mean'] * scale:{fmt}}{sd}"

    lines = ["", "## What each edgekd step adds on its own, over the seeds", "",
             "compare_tools' ablation (batch 1, both models of a step timed in the same comparison on the same "
             "texts), mean ± sd over the seeds that have the step; accuracy changes in points; rows from a stage's "
             "record (no timed model) have no latency.", "",
             "| step | from → to | p50 ms before → after | speed-up | Δ test | Δ val | Δ OOD | × size | seeds |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for step in ablation:
        st = step["stats"]
        p50 = (f"{st['p50_before_ms']['mean']:.3f} → {st['p50_after_ms']['mean']:.3f}"
               if st["p50_before_ms"]["n"] and st["p50_after_ms"]["n"] else "—")
        speed = mean(step, "speedup", ".2f")
        lines.append(f"| {step['step']} | {step['what']} | {p50} | {speed if speed == '—' else speed + '×'} | "
                     f"{mean(step, 'accuracy_delta', '+.2f', 100)} | {mean(step, 'val_accuracy_delta', '+.2f', 100)} | "
                     f"{mean(step, 'ood_accuracy_delta', '+.2f', 100)} | {mean(step, 'size_ratio', '.2f')} | "
                     f"{len(step['seeds'])} of {n_seeds} |")
    return lines


def _seed_averaged(per_seed: dict[int, dict[str, Any]], seeds: list[int], names: list[str]) -> dict[str, Any]:
    """The shipped artifact against each path averaged over the seeds, text by text (the text the
    unit: report.seed_averaged), when every seed shipped the row compare_tools compared and recorded
    its answers on the same test texts; else the reason it is not shown."""
    if len(seeds) < 2:
        return {}
    labels = [per_seed[s].get("test_labels") for s in seeds]
    if not all(_verdict_is_shipped(per_seed[s]) for s in seeds):
        return {"why": "a seed's comparison chose another folder than the one it ships"}
    if any(lab is None for lab in labels):
        return {"why": "a seed's compare.json has no test_labels (written by compare_tools since 2026-12-05): "
                       "measure it again"}
    if any(lab != labels[0] for lab in labels[1:]):
        return {"why": "the seeds' test splits differ (data.split.seed set per seed?), so their texts do not pair"}
    answers = [{r["name"]: r.get("test_predictions") for r in per_seed[s].get("rows") or []} for s in seeds]
    shipped = [next((r.get("test_predictions") for r in per_seed[s].get("rows") or [] if r.get("best")), None)
               for s in seeds]
    out: dict[str, Any] = {}
    for name in names:
        pairs = [(a, by_name.get(name)) for a, by_name in zip(shipped, answers, strict=True)]
        if all(a is not None and b is not None for a, b in pairs):
            got = report.seed_averaged(pairs, labels[0])
            if got is not None:
                out[name] = got
    return out


def _verdict_is_shipped(data: dict[str, Any]) -> bool:
    """compare_tools' own figures (verdict, paired comparison) concern the row it chose: is that the
    shipped folder's?"""
    chosen = next((r["name"] for r in data.get("rows") or [] if r.get("best")), None)
    return not data.get("shipped") or chosen == f"edgekd-{data['shipped']}"


def _verdict(data: dict[str, Any]) -> str | None:
    """compare_tools' verdict, which concerns the row it chose: said so when that is not the shipped one."""
    summary = (data.get("verdict") or {}).get("summary")
    if not _verdict_is_shipped(data):
        chosen = next((r["name"] for r in data.get("rows") or [] if r.get("best")), None)
        return (f"the figures above are the shipped {data['shipped']}'s; compare_tools' own pick was "
                f"{chosen or 'none'} ({(data.get('best') or {}).get('why', 'its rule')}), and its verdict, on "
                f"that pick: {summary}")
    return summary


def _timing_lines(timing: dict[str, Any]) -> list[str]:
    """How each seed's comparison was timed, one line per seed, and the note when their rounds or calls
    differ (:func:`timing_over_seeds`)."""
    lines = []
    for s, t in (timing.get("per_seed") or {}).items():
        if t is None:
            continue
        calls = t["calls"] if isinstance(t["calls"], dict) else {b: t["calls"] for b in t["batch_sizes"] or []}
        what = f"{t['source']} results" if t.get("source") else "compare_tools result"
        lines.append(f"- seed {s}: {what} written {t['created'] or 'at an unrecorded time'}, "
                     f"{'unrecorded' if t['rounds'] is None else t['rounds']} round(s), {t['threads']} thread(s), "
                     + (", ".join(f"{n} call(s) at batch {b}" for b, n in calls.items()) or "calls not recorded"))
    if timing.get("note"):
        lines += ["", f"**Note:** {timing['note']}."]
    return [*lines, ""] if lines else []


def markdown(agg: dict[str, Any], title: str) -> str:
    seeds = agg["seeds"]

    def f(v: float | None, fmt: str, limit: float | None = None) -> str:
        if v is None:
            return "—"
        return report.near_format(v, limit, fmt) if limit is not None else format(v, fmt)

    lines = [f"# {title}", "", f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}; mean ± sample sd.", "",
             *_timing_lines(agg.get("timing") or {}),
             "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | bar | seeds meeting it |",
             "|---|" + "--:|" * len(seeds) + "--:|---|--:|"]
    for r in agg["rows"]:
        fmt, limit = r["format"], r.get("limit")
        ms = f"{f(r['mean'], fmt)} ± {f(r['sd'], fmt.lstrip('+'))}" if r["n"] else "—"
        if r["n"] and r["n"] < len(seeds):  # the mean of the seeds that have the figure: say of how many
            ms += f" ({r['n']} of {len(seeds)})"
        lines.append(f"| {r['what']} | " + " | ".join(f(r["values"][s], fmt, limit) for s in seeds)
                     + f" | {ms} | {r.get('bar', '')} | "
                     + (f"{r['seeds_meeting']} of {len(seeds)}" if "bar" in r else "") + " |")
    if agg.get("pipeline_only"):
        lines += ["", "**Pipeline figures only** (`--pipeline-only`): the usual paths were not built, so the bars "
                  "against them are not shown and not met here; run without `--pipeline-only` for them.", ""]
    else:
        unmet = [str(s) for s, ok in (agg.get("verdicts_met") or {}).items() if not ok]
        lines += ["", "**All bars met in every seed.**" if agg["all_met"] else
                  "**Not every bar is met in every seed** (see the last column"
                  + (f"; compare_tools' own verdict is not met in seed {', '.join(unmet)}" if unmet else "") + ").", ""]
    lines += [f"- seed {s}: {v}" for s, v in agg["verdicts"].items() if v]
    if agg.get("paired"):
        labels = {**USUAL_LABELS, "student-fp32": "fp32 distilled student"}
        lines += ["", "## The shipped artifact against each path, text by text", "",
                  "Shipped minus the path on the same test texts, in points: the difference, its 95% interval "
                  "and McNemar's exact p (compare_tools' paired comparison). The last column averages each "
                  "text's difference over the seeds first and takes the text as the unit of its 95% interval "
                  "(the seeds share their test texts, so a text hard for every seed counts once).", "",
                  "| against | " + " | ".join(f"seed {s}" for s in seeds) + " | mean of the seeds |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        averaged = agg.get("averaged") or {}
        for name, by_seed in agg["paired"].items():
            cells = []
            for s in seeds:
                pr = by_seed.get(s)
                cells.append("—" if pr is None else f"{pr['diff_pp']:+.2f} ({pr['ci95_pp'][0]:+.2f} to "
                             f"{pr['ci95_pp'][1]:+.2f}), p {pr['mcnemar_p']:.2f}")
            av = averaged.get(name)
            cells.append("—" if av is None else
                         f"{av['diff_pp']:+.2f} ({av['ci95_pp'][0]:+.2f} to {av['ci95_pp'][1]:+.2f})")
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
        if averaged.get("why"):
            lines += ["", f"Mean of the seeds not shown: {averaged['why']}."]
    if agg.get("ablation"):
        lines += _ablation_markdown(agg["ablation"], len(seeds))
    return "\n".join(lines) + "\n"


DEFAULT_SEEDS = (42, 43, 44)


def default_out_name(name: str, seeds: list[int]) -> str:
    """The summary folder's name without --out: ``<name>-seeds`` for the default seeds, and with the
    seeds in the name for any others, so a run over a few other seeds never overwrites the summary of
    the three."""
    return f"{name}-seeds" if tuple(seeds) == DEFAULT_SEEDS else f"{name}-seeds-" + "-".join(map(str, seeds))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="default", help="built-in recipe or YAML file (default: default)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="seeds (default 42 43 44)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="recipe override key=value (repeatable)")
    p.add_argument("--runs", type=int, default=None,
                   help="compare_tools: timed calls per model and batch size (default: every test text once at each)")
    p.add_argument("--threads", type=int, default=None, help="compare_tools: threads for every runtime")
    p.add_argument("--rounds", type=int, default=None, help="compare_tools: timing rounds (default: compare_tools' own)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="compare_tools: batch sizes timed (default 1 8; the bars read batch 1)")
    p.add_argument("--no-memory", action="store_true", help="compare_tools: skip the memory measurements")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<name>-seeds; with other seeds, runs/<name>-seeds-<seeds>)")
    p.add_argument("--no-run", action="store_true", help="measure existing run folders only (no edgekd run)")
    p.add_argument("--reuse", action="store_true",
                   help="with --no-run: read each run's compare/compare.json instead of measuring again (refused "
                        "when the run changed after it)")
    p.add_argument("--pipeline-only", action="store_true",
                   help="no compare_tools: each seed's figures from its own eval, quantize and bench records")
    args = p.parse_args(argv)
    if args.reuse and (not args.no_run or args.pipeline_only):
        p.error("--reuse reads the compare_tools results of runs left as they are: give --no-run, without "
                "--pipeline-only")
    # Options of a measurement that will not happen are refused, not ignored.
    given = [flag for flag, value in (("--runs", args.runs), ("--threads", args.threads), ("--rounds", args.rounds),
                                      ("--batch-sizes", args.batch_sizes), ("--no-memory", args.no_memory or None))
             if value is not None]
    if given and (args.reuse or args.pipeline_only):
        p.error(f"{', '.join(given)}: compare_tools does not run with {'--reuse' if args.reuse else '--pipeline-only'}, "
                "so nothing would read them: drop them")
    if any(item.split("=", 1)[0].strip() == "seed" for item in args.sets):
        p.error("--set seed=...: each run's seed is one of --seeds; give the seeds there")
    args.batch_sizes = [1, 8] if args.batch_sizes is None else args.batch_sizes
    if 1 not in args.batch_sizes:
        p.error("--batch-sizes: include 1 (every bar is read at batch 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    """The script owns its process as ``edgekd run`` does: the libraries' warnings and a converter's stderr go to
    each seed's ``logs/warnings.log`` (its run, then its comparison), not between the progress lines."""
    args = parse_args(argv)
    from edgekd import warnings_log

    warnings_log.install()
    try:
        return _main(args)
    finally:
        warnings_log.uninstall()


def _main(args: argparse.Namespace) -> int:
    import compare_tools

    from edgekd import api, warnings_log
    from edgekd.runfolder import atomic_write_text

    try:
        base = api.load_recipe_or_run(args.recipe, args.sets)
        per_seed: dict[int, dict[str, Any]] = {}
        for s in args.seeds:
            sets = [*args.sets, f"seed={s}", f"name={base.name}-seed{s}"]
            recipe = api.load_recipe_or_run(args.recipe, sets)
            if not args.no_run:
                api.run_recipe(args.recipe, sets, argv=["benchmarks/seeds.py", args.recipe, *(f"--set={x}" for x in sets)])
            elif not recipe.run_dir().is_dir():
                raise EdgeKDError(f"--no-run: {recipe.run_dir()} does not exist; run it first (drop --no-run).")
            else:  # nothing runs: the --set values must be the ones the run was made with, not ignored
                check_saved_recipe(recipe.run_dir(), recipe, args.sets)
            shipped = shipped_folder(recipe.run_dir())
            warnings_log.sink.attach(recipe.run_dir())  # the comparison's library warnings: this seed's log
            if args.pipeline_only:
                per_seed[s] = pipeline_record(recipe.run_dir(), shipped)
            elif args.reuse:
                per_seed[s] = {**reuse_compare(recipe.run_dir()), "shipped": shipped}
            else:  # compare_tools' verdict then concerns the shipped folder, not a folder of its own choosing
                per_seed[s] = {**compare_tools.compare(recipe.run_dir(), runs=args.runs, threads=args.threads,
                                                       rounds=args.rounds,
                                                       batch_sizes=tuple(args.batch_sizes),
                                                       memory=not args.no_memory, artifact=shipped),
                               "shipped": shipped}
            shipped_row(per_seed[s])  # a missing shipped row is refused before any table is written
        agg = aggregate(per_seed)  # seeds timed unlike each other are refused here, before any table
    except EdgeKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(agg, f"edgekd '{base.name}' over {len(args.seeds)} seeds")
    out = Path(args.out) if args.out else Path(base.output_dir) / default_out_name(base.name, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "seeds.md", text)
    atomic_write_text(out / "seeds.json", json.dumps(agg, indent=2, default=str))
    print(text)
    print(f"Written to {out}: seeds.md, seeds.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
