"""Is edgekd better than what I would do with the usual tools? One run, one machine, the same texts.

    python benchmarks/compare_tools.py runs/default [--runs N] [--threads T] [--out DIR] [--artifact NAME]
                                       [--ood NAME|none] [--calibration N] [--no-memory]

Measures side by side, on the run's own data, at batch 1 and batch 8:
  - the teacher and the student in PyTorch fp32 eager;
  - the usual paths, on the distilled student *and* on the pruned student edgekd ships (so the
    toolchain is compared on the same model, apart from what pruning adds):
      Optimum: ``optimum-cli export onnx`` (a pruned student with per-layer FFN widths goes through
      the exporter the CLI calls, ``onnx_export_from_model``), then ``ORTQuantizer`` dynamic int8
      with the ``AutoQuantizationConfig`` of this CPU's instruction set;
      Intel: OpenVINO + NNCF int8 post-training quantization (``ModelType.TRANSFORMER``) calibrated
      on training texts (``pip install 'edgekd[intel]'``);
      torchao: ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig`` under ``torch.compile``;
  - edgekd's export folders, the best being the fastest at p50 *on validation texts* (the candidates
    are timed there too, on one plan of calls, at the first batch size) of those whose *validation*
    accuracy is within the run's budget (``quantize.max_accuracy_drop``) of the fp32 student's, or
    ``--artifact NAME`` (then only that folder and the folders its ablation steps start from, e.g.
    ``onnx`` for ``onnx-int8``, are measured); test accuracy and latency are reported, never used to choose.

Every model is timed in its own child process, in ``--rounds`` rounds (9): each round runs every
model once, in a rotated order (reversed every other round), on the next slice of one plan of calls,
as ``edgekd bench`` does, so no runtime shares a process with another (a second ONNX Runtime session
in the process cost about 10-30% here) and drift on a shared machine touches every row alike; no
model is always timed right after the same one; ``--one-process`` times
every model in one process in rotating blocks instead (faster: torchao compiles once). Same thread
count, same real test texts in the same order and batches for every row (each text at its own length;
batches padded to their longest text; by default every test text timed once at each batch size:
ceil(n / b) calls of b texts), each model fed its own tokenizer's ids of them: with a trimmed vocabulary
the untrimmed models (the teacher, the distilled student, the usual paths on it) read the original
tokenizer's ids, as their users would (the trimmed tokenizer splits a word it dropped into more pieces,
so its ids of a text are longer). Each row records the sha256 of its plan of texts, its tokenizer and the
sha256 of the arrays it was fed; the table refuses rows timed on another plan, and rows of one tokenizer
fed different arrays, and says how many tokens a text averages in each tokenizer. Before the clock starts,
every model runs each distinct input shape of its slice once, untimed. Each model
is scored on the test split, the validation split and an out-of-domain set (product reviews,
``amazon-snippets``): dynamic int8 (edgekd's and Optimum's, whose answer for a text depends on the
other texts of the call) one text per call at its own length, as it is served, every other model in
length-sorted batches of 32. An ablation table gives what each edgekd step adds on its own (distill,
prune + recovery, export/graph optimisation, each quantize method, and any later step whose
export folder says what it derives from). The environment (CPU flags, versions, threads) is
recorded.

Writes ``compare.md``, ``compare.png`` and ``compare.json`` to ``--out`` (default
``runs/<name>/compare/``) and prints the table and the verdict against the issue's bar (at least
``--target-speedup`` (1.5) times faster than every usual path on the distilled student, as accurate
as each, within 0.5 points of the fp32 student, 97% of its out-of-domain accuracy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import _compare_report as report
import _openvino_path as openvino
import _optimum_path as optimum
import numpy as np
from _compare_specs import _folder_bytes, _specs, _student_dir, _students  # noqa: F401 (the tests use them)

from edgekd.errors import EdgeKDError, StageError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_compare_worker.py"
# Rounds by default. Each round starts every model in a fresh process, and a process's own state moves its
# p50 (the int8 file against its same-graph twin, 8 repeats of 1,275 calls on seed 42: sd 0.070 of the
# ratio with 3 rounds, 0.030 with 9); 9 rounds take about twice as long as 3 (15 against 7 minutes here).
ROUNDS = 9
VERSIONED = ("edgekd", "torch", "torchao", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
             "onnxscript", "executorch", "numpy", "matplotlib")
MEMORY_ROUNDS = 5
INPUTS = ("the same test texts for every row, in the same order and batches (one plan of text indices); each model "
          "fed its own tokenizer's ids of them, each text at its own length; batches padded to their longest text")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_run(run: Path) -> None:
    missing = [str(p) for p in (run / "recipe.yaml", run / "teacher" / "model" / "config.json") if not p.is_file()]
    if not run.is_dir() or missing:
        raise StageError(f"{run} is not a finished run folder (missing: {', '.join(missing) or run}). "
                         "Run `edgekd run RECIPE` first, then compare its run folder.")


def _ablation_sources(entries: list[dict[str, Any]], artifact: str) -> set[str]:
    """``artifact`` and the export folders its ablation steps start from: the folder its artifact.json
    names as ``derived_from``, and for a quantized folder the fp32 folder its runtime runs (onnx-int8:
    onnx), each in turn with its own. They are measured for the ablation's rows only; the comparison's
    artifact stays ``artifact``."""
    by = {e["name"]: e for e in entries}
    keep, todo = {artifact}, [artifact]
    while todo:
        entry = by[todo.pop()]
        sources = [(entry.get("meta") or {}).get("derived_from")]
        if entry.get("precision", "fp32") != "fp32":
            sources += [n for n, e in by.items()
                        if e.get("precision", "fp32") == "fp32" and e.get("target") == entry.get("exporter")]
        for name in sources:
            if name in by and name not in keep:
                keep.add(name)
                todo.append(name)
    return keep


def _export_entries(run: Path, artifact: str | None) -> list[dict[str, Any]]:
    from edgekd.devices.bench import discover

    entries = discover(run)
    names = [e["name"] for e in entries]
    if artifact is not None:
        if artifact not in names:
            raise StageError(f"--artifact {artifact}: no export folder {run / 'export' / artifact}; "
                             f"present: {', '.join(names) or 'none'}.")
        keep = _ablation_sources(entries, artifact)
        entries = [e for e in entries if e["name"] in keep]
    if not entries:
        raise StageError(f"{run / 'export'} holds no export folders: add export targets to the recipe "
                         "(e.g. --set 'export.targets=[onnx]' and quantize.enabled=true) and run the pipeline first.")
    return entries


def _timing_rows(n: int, batch: int, warmup: int, runs: int, seed: int) -> np.ndarray:
    """``warmup`` untimed batches, then ``runs`` timed batches of ``batch`` test rows. The timed rows
    use every example once before any repeats (so with ``runs`` = ceil(n / batch), each test text is timed
    once, the last batch topped up from a second pass); the warm-up rows are drawn apart from them."""
    rng = np.random.default_rng(seed)
    warm = np.resize(rng.permutation(n), warmup * batch)
    need = runs * batch
    timed = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
    return np.concatenate([warm, timed]).reshape(warmup + runs, batch)


def _child_paths(mode: str, tag: str, workdir: Path) -> tuple[Path, Path]:
    return workdir / f"{mode}-{tag}.json", workdir / f"{mode}-{tag}.result.json"


def _timing_spawn(job: dict[str, Any], workdir: Path) -> tuple[list[str], Path, Path, Path]:
    """A timing process started ahead of its turn (``edgekd.devices.measure.Prestarted``): the job's
    ``name`` is its tag, and it runs as ``_child`` runs it."""
    job_path, result_path = _child_paths("timing", job["name"], workdir)
    return [sys.executable, str(WORKER), "timing", str(job_path), str(result_path)], job_path, result_path, workdir


def _child(mode: str, job: dict[str, Any], workdir: Path, tag: str, threads: int,
           timeout_s: float) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    from edgekd.devices.measure import child_env, read_result

    job_path, result_path = _child_paths(mode, tag, workdir)
    job_path.write_text(json.dumps(job, indent=2, default=str))
    cmd = [sys.executable, str(WORKER), mode, str(job_path), str(result_path)]
    try:
        proc = subprocess.run(cmd, env=child_env(threads), cwd=workdir, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"the {mode} process timed out after {timeout_s:.0f} s"}, None
    if not result_path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
        return {"status": "error", "error": f"the {mode} process exited with {proc.returncode}: {tail}"}, None
    return read_result(result_path)


def _time_in_rounds(specs: list[dict[str, Any]], job: dict[str, Any], work: Path, threads: int, timeout_s: float,
                    rounds: int, evaluate: bool = True, tag: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every model in its own timing process, ``rounds`` times, in a rotated order (reversed every other
    round), each round on its slice of the timed calls (``edgekd.devices.measure.in_rounds``); scored
    in the first round. ``job["runs"]`` holds the timed calls of each batch size (keyed by the batch size
    as text), each split into as many slices as there are rounds. ``evaluate``: score in the first round;
    ``tag`` starts the name of each child's job file.
    Returns what one timing process over every model returns: ``({"models": ...}, outputs)``."""
    from edgekd.devices import measure

    cpu: dict[tuple[str, int], list[float]] = {}
    envs: list[Any] = []
    t0 = time.perf_counter()
    calls = {int(b): int(n) for b, n in job["runs"].items()}
    fewest = min(calls.values())
    spans = measure.round_spans(fewest, rounds)
    # Each batch size's own calls split into as many slices as the batch size with the fewest has rounds.
    by_batch = {b: measure.round_spans(n, len(spans)) for b, n in calls.items()}

    def round_job(entry: dict[str, Any], r: int) -> dict[str, Any]:
        spec = entry["spec"]
        span = {"runs": {str(b): s[r][1] for b, s in by_batch.items()},
                "call_offset": {str(b): s[r][0] for b, s in by_batch.items()}}
        return {**job, "name": f"{tag}{spec['name']}-r{r}", "models": [spec], **span, "evaluate": evaluate and r == 0}

    def measure_one(entry: dict[str, Any], r: int, _offset: int, _n: int) -> tuple[dict, Any]:
        spec, one = entry["spec"], round_job(entry, r)
        if ahead is not None:
            res, outs = ahead.run(one)
        else:
            res, outs = _child("timing", one, work, one["name"], threads, timeout_s)
        m = (res.get("models") or {}).get(spec["name"]) or {"status": "error", "error": res.get("error")}
        envs.append(res.get("environment"))
        if isinstance(res.get("process"), dict):
            processes.append({"model": spec["name"], "round": r, **res["process"]})
        for case in m.get("cases") or []:
            cpu.setdefault((spec["name"], case["batch"]), []).extend(case.pop("cpu_times_ms", []))
        return m, (outs or {}).get(spec["name"])

    def plan(order: list[dict[str, Any]], r: int, _offset: int, _n: int) -> None:
        if ahead is not None:
            ahead.plan([round_job(e, r) for e in order])

    todo = [{"name": s["name"], "spec": s} for s in specs]
    processes: list[dict[str, Any]] = []
    # POSIX: each round's processes start ahead of their turn, as many at a time as there are CPUs, and
    # import their runtimes while no model is timed (as edgekd bench); elsewhere one starts per turn.
    with contextlib.ExitStack() as stack:
        ahead = (stack.enter_context(measure.Prestarted(work, timeout_s, spawn=_timing_spawn))
                 if os.name == "posix" else None)
        measure.in_rounds(todo, fewest, rounds, measure_one, pick=lambda merged: merged, on_round=plan)
    models, outputs = {}, {}
    for e in todo:
        m = {k: v for k, v in e.items() if k not in ("name", "spec", "_outputs")}
        for case in m.get("cases") or []:
            times = cpu.get((e["name"], case["batch"]))
            if "p50_ms" in case and times:
                case["cpu_p50_ms"] = float(np.percentile(times, 50))
        models[e["name"]] = m
        if e["_outputs"] is not None:
            outputs[e["name"]] = e["_outputs"]
    return ({"models": models, "timing_seconds": time.perf_counter() - t0, "rounds": len(spans),
             "process": "one per model and round", "environment": next((x for x in envs if x), None),
             **({"processes": processes} if processes else {})}, outputs)


def _timing_record(timing: dict[str, Any] | None) -> dict[str, Any]:
    """What compare.json keeps of how the models were timed (not the figures, which are in the rows):
    with ``processes`` where they were started ahead of their turn, so compare.md can say whether any
    import overlapped a timed model."""
    timing = timing or {}
    record = {k: timing.get(k) for k in ("timing_seconds", "rounds", "process", "blocks", "switch_warmup", "error")}
    if timing.get("processes"):
        record["processes"] = timing["processes"]
    return record


def _time_in_one_process(job: dict[str, Any], work: Path, threads: int, timeout_s: float,
                         tag: str = "all") -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Every model loaded in one timing process, timed in rotating blocks (``--one-process``)."""
    timing, outputs = _child("timing", job, work, tag, threads, timeout_s)
    for m in (timing.get("models") or {}).values():
        for case in m.get("cases") or []:
            case.pop("times_ms", None)
            case.pop("cpu_times_ms", None)
    timing.update(rounds=1, process="one for every model")
    return timing, outputs


def _time_on_validation(specs: list[dict[str, Any]], job: dict[str, Any], arrays: dict[str, np.ndarray],
                        segments: dict[str, tuple[int, int, np.ndarray]], batch: int, calls: int, seed: int,
                        work: Path, threads: int, timeout_s: float, rounds: int,
                        one_process: bool) -> dict[str, Any] | None:
    """The candidates of the best artifact (``specs``) timed on validation texts, so that the choice reads
    no test figure: as the test timing (same warm-up, processes and rounds, ``job``'s threads), at
    ``batch`` only, on one plan of calls for every candidate: each validation text once (ceil(n / batch)
    calls), at most ``calls`` (the test timing's at that batch size, so the choice costs no more per
    candidate than its test row). Nothing is scored. None when there is nothing to time."""
    if not specs or "validation" not in segments:  # an empty validation split has no segment
        return None
    v0, v1, _ = segments["validation"]
    n_val = v1 - v0
    runs = max(1, min(calls, math.ceil(n_val / batch)))
    plan = _timing_rows(n_val, batch, job["warmup"], runs, seed + batch) + v0  # rows of the evaluation arrays
    np.savez(work / "inputs-validation.npz", **{**arrays, f"rows_b{batch}": plan})
    vjob = {**job, "models": specs, "runs": {str(batch): runs}, "batch_sizes": [batch],
            "inputs": "inputs-validation.npz"}
    if one_process:
        timing, _ = _time_in_one_process({**vjob, "evaluate": False}, work, threads, timeout_s, tag="validation")
    else:
        timing, _ = _time_in_rounds(specs, vjob, work, threads, timeout_s, rounds, evaluate=False, tag="validation-")
    models = timing.get("models") or {}
    return {"batch": batch, "calls": runs, "warmup": job["warmup"], "examples": n_val,
            "models": [s["name"] for s in specs], "rounds": timing.get("rounds"), "process": timing.get("process"),
            "timing_seconds": timing.get("timing_seconds"), "error": timing.get("error"),
            "cases": {name: {str(c["batch"]): {k: v for k, v in c.items() if k != "batch"}
                             for c in (models.get(name) or {}).get("cases") or []} for name in models}}


def _environment(threads: int) -> dict[str, Any]:
    from edgekd.devices import remote_runner

    env = remote_runner.environment(threads)
    env["cpu_flags"] = remote_runner.cpu_facts()["flags"]
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    env["versions"] = versions
    return env


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _assemble(specs: list, skipped: list, timing: dict[str, Any], outputs: dict | None, memory: dict,
              segments: dict[str, tuple[int, int, np.ndarray]], metric_fn: Any) -> list[dict[str, Any]]:
    """Rows of the tables. ``segments`` (name -> (start, stop, labels)) splits each model's logits on
    the evaluation rows into the test split, the validation split and the out-of-domain set."""
    rows = []
    measured = (timing or {}).get("models") or {}
    for spec in specs:
        m = measured.get(spec["name"]) or {"status": "error", "error": timing.get("error") or "not measured"}
        row = {k: v for k, v in spec.items() if k not in ("path", "file")}
        row.update(status=m.get("status"), error=m.get("error"), load_s=m.get("load_s"),
                   runtime_info=m.get("runtime"), info=m.get("info"), notes=list(spec.get("notes") or []))
        row["cases"] = {str(c["batch"]): {k: v for k, v in c.items() if k != "batch"} for c in m.get("cases") or []}
        logits = (outputs or {}).get(spec["name"])
        for seg, (a, b, labels) in segments.items():
            m_seg = metric_fn({"logits": logits[a:b]}, labels) if logits is not None else None
            key = {"test": "metrics", "validation": "val_metrics", "ood": "ood_metrics"}[seg]
            row[key] = m_seg
            if logits is not None and np.ndim(logits) == 2 and b > a:
                # [right, scored]: the accuracy bars are decided on these counts (report.share), never on floats
                right = int((np.asarray(logits[a:b]).argmax(-1) == np.asarray(labels)).sum())
                row.setdefault("counts", {})[seg] = [right, int(b - a)]
            if seg == "test" and logits is not None and np.ndim(logits) == 2:
                # each test text's answer, for the paired comparison on the same texts (report.paired)
                row["test_predictions"] = np.asarray(logits[a:b]).argmax(-1).tolist()
        row["accuracy"] = (row.get("metrics") or {}).get("accuracy")
        row["val_accuracy"] = (row.get("val_metrics") or {}).get("accuracy")
        row["ood_accuracy"] = (row.get("ood_metrics") or {}).get("accuracy")
        if m.get("eval_error"):
            row["notes"].append(f"evaluation failed: {m['eval_error']}")
        mem = memory.get(spec["name"]) or {}
        row["memory"] = {k: mem.get(k) for k in ("load_delta_mb", "peak_delta_mb", "rss_before_load_mb",
                                                 "peak_rss_mb", "load_s", "error", "note") if k in mem}
        if mem.get("size_bytes") is not None:
            row["size_bytes"] = mem["size_bytes"]
        rows.append(row)
    for s in skipped:
        rows.append({**{k: v for k, v in s.items() if k not in ("path", "file")},
                     "cases": {}, "accuracy": None, "metrics": None, "memory": {}, "notes": []})
    order = {g: i for i, g in enumerate(("teacher", "student", "optimum", "openvino", "torchao", "edgekd"))}
    return sorted(rows, key=lambda r: order.get(r["group"], 9))


def _ood(recipe: Any, ctx: Any, name: str | None) -> tuple[Any, str]:
    """(OodSet, how chosen) of the out-of-domain set, or (None, why none)."""
    from edgekd.ood import OOD_LABELS, label_map, load_ood, run_texts

    if name is None:
        name = recipe.eval.ood_dataset
        how = "eval.ood_dataset of the run's recipe"
        if not name and label_map(ctx.task.label_names) is not None:
            name, how = "amazon-snippets", f"the default for {'/'.join(OOD_LABELS)} runs"
    else:
        how = "--ood"
    if not name or name == "none":
        return None, "no out-of-domain set (--ood NAME, or eval.ood_dataset in the recipe)"
    # less the run's own texts, as the eval stage scores it
    return load_ood(name, ctx.task.label_names, recipe.eval.ood_min_abs_score, exclude=run_texts(ctx)), how


class _Tokens:
    """The tokenizers of a comparison. ``shipped`` is the pruned student's own (it tokenizes every edgekd
    row's inputs); with a trimmed vocabulary (``prune.trim_vocab``) ``original`` is the distilled student's,
    whose ids the untrimmed models read (timed and scored on them, for the same texts), and ``table`` maps
    each shipped id to the original id of the same token."""

    def __init__(self, shipped: Any, original: Any, table: np.ndarray | None):
        self.shipped, self.original, self.table = shipped, original, table

    def describe(self) -> str:
        if self.table is None:
            return f"one vocabulary ({len(self.shipped)} tokens) for every model"
        return (f"trimmed: the pruned student and edgekd's exports read the trimmed tokenizer's ids ({len(self.shipped)} "
                f"tokens); the untrimmed models (teacher, distilled student, the usual paths on it; "
                f"{len(self.original)} tokens) are timed and scored on their own tokenizer's ids of the same texts")

    def lengths(self, arrays: dict[str, np.ndarray], n: int) -> dict[str, Any]:
        """Mean tokens per test text (of the ``n`` timed and scored) in each tokenizer's ids, and how many
        of those texts are of another length in the two (a trimmed vocabulary splits words it dropped into
        more pieces)."""
        shipped = np.asarray(arrays["lengths"][:n])
        out: dict[str, Any] = {"texts": int(n), "shipped": {"vocabulary": len(self.shipped),
                                                            "mean_tokens_per_text": float(shipped.mean())}}
        if "orig_lengths" in arrays:
            orig = np.asarray(arrays["orig_lengths"][:n])
            out["original"] = {"vocabulary": len(self.original), "mean_tokens_per_text": float(orig.mean())}
            out["texts_differing_in_length"] = int((orig != shipped).sum())
        return out


def _tokenizers(ctx: Any, recipe: Any, students: dict[str, Path], teacher: Path) -> _Tokens:
    original = ctx.task.load_tokenizer(students["student"])
    trimmed = recipe.prune.enabled and recipe.prune.trim_vocab
    if trimmed and "pruned" not in students:
        raise StageError("the run trimmed its vocabulary (prune.trim_vocab) but holds no pruned student "
                         "(prune/model): run the prune stage first.")
    if ctx.task.load_tokenizer(teacher).get_vocab() != original.get_vocab():
        # Every untrimmed row, the teacher's too, reads the distilled student's token ids.
        raise StageError(f"the teacher ({teacher}) and the distilled student ({students['student']}) have different "
                         "vocabularies, and this script feeds the teacher the distilled student's token ids; compare a "
                         "run whose student was built from the teacher (or shares its tokenizer).")
    if not trimmed:
        return _Tokens(original, original, None)
    from edgekd.pruning.vocab import original_ids

    shipped = ctx.task.load_tokenizer(students["pruned"])
    return _Tokens(shipped, original, original_ids(shipped, original).numpy())


def _eval_arrays(ctx: Any, tok: Any, n_eval: int, ood_set: Any,
                 prefix: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int, np.ndarray]]]:
    """The evaluation rows tokenized by ``tok``: the test split (first: the timing rows index it), the
    validation split (the best artifact is chosen there), the out-of-domain set. Returns the arrays
    (keys ``{prefix}ids``, ``{prefix}mask``, ``{prefix}lengths``) and each segment's (start, stop, labels)."""
    from edgekd.devices.measure import concat_padded

    parts = [("test", ctx.tokenized("test", tok), n_eval)]
    val = ctx.tokenized("validation", tok)
    parts.append(("validation", val, len(val)))
    if ood_set is not None:
        from edgekd.tasks.text.task import TokenizedSplit

        ood_split = TokenizedSplit(ctx.task.tokenize(tok, ood_set.texts), ood_set.labels, tok.pad_token_id or 0)
        parts.append(("ood", ood_split, len(ood_split)))
    arrays_parts, lengths, segments, start = [], [], {}, 0
    for seg, split, count in parts:
        if count == 0:
            continue
        c = split.collate(np.arange(count))
        arrays_parts.append({"input_ids": c["input_ids"], "attention_mask": c["attention_mask"]})
        lengths.append(split.lengths[:count])
        segments[seg] = (start, start + count, split.labels[:count])
        start += count
    full = arrays_parts[0]
    for extra in arrays_parts[1:]:
        full = concat_padded(full, extra)
    return ({f"{prefix}ids": full["input_ids"], f"{prefix}mask": full["attention_mask"],
             f"{prefix}lengths": np.concatenate(lengths)}, segments)


def ablation_batch_of(batch_sizes: tuple[int, ...] | list[int]) -> int:
    """The batch size the ablation reads: batch 1 whenever it was timed, in whatever order --batch-sizes
    names it (seeds.py pools the ablation as batch 1's and checks the ``ablation_batch`` compare.json
    records); else the first one timed, which compare.md's heading then names."""
    return 1 if 1 in batch_sizes else batch_sizes[0]


def compare(run_dir: str | Path, out_dir: str | Path | None = None, runs: int | None = None, warmup: int = 20,
            threads: int | None = None, batch_sizes: tuple[int, ...] = (1, 8), artifact: str | None = None,
            eval_limit: int | None = None, target_speedup: float = 1.5, timeout_s: float = 3600,
            seed: int = 0, ood: str | None = None, calibration: int = 300, memory: bool = True,
            torchao: str = "compile", rounds: int | None = None, one_process: bool = False) -> dict[str, Any]:
    """Measure everything, write compare.md/png/json into ``out_dir`` and return the JSON data.
    ``runs`` (timed calls per batch size; default: ceil(n / b) at batch b, so every test example scored
    is timed once at each batch size) and ``rounds`` (default ROUNDS; 1 with ``one_process``)
    as ``--runs`` and ``--rounds``."""
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe
    from edgekd.report import shipped_artifact
    from edgekd.runfolder import RunFolder, atomic_write_bytes, atomic_write_text

    started = time.perf_counter()
    run = Path(run_dir).resolve()  # the measuring children run in other directories
    _check_run(run)
    if (runs is not None and runs < 1) or warmup < 0 or (threads is not None and threads < 1) or not batch_sizes \
            or min(batch_sizes) < 1:
        raise EdgeKDError("--runs and --threads must be at least 1, --warmup at least 0, batch sizes at least 1.")
    rounds = rounds if rounds is not None else (1 if one_process else ROUNDS)
    if rounds < 1:
        raise EdgeKDError(f"--rounds {rounds}: at least 1 (each round times every model once, in its own process).")
    if one_process and rounds != 1:
        raise EdgeKDError(f"--one-process times every model in one process, once: it takes no --rounds ({rounds}); "
                          "drop one of the two.")
    threads = threads or default_threads()
    out = Path(out_dir) if out_dir else run / "compare"
    recipe = load_recipe(run / "recipe.yaml")
    entries = _export_entries(run, artifact)
    students = _students(run)
    student = students["student"]
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}

    ctx = create_context(recipe)
    tokens = _tokenizers(ctx, recipe, students, run / "teacher" / "model")
    tok = tokens.shipped
    test = ctx.tokenized("test", tok)
    n = len(test)
    if n == 0:
        raise StageError(f"the test split of {run} is empty: nothing to measure on.")
    n_eval = min(n, eval_limit) if eval_limit else n
    # By default every test text is timed once at every batch size (ceil(n / b) calls of b texts), so each
    # p50 is over the split's own lengths (as the table was measured), not over a sample of them.
    calls = {b: math.ceil(n_eval / b) if runs is None else runs for b in batch_sizes}
    val = ctx.tokenized("validation", tok)
    ood_set, ood_how = _ood(recipe, ctx, ood)
    arrays, segments = _eval_arrays(ctx, tok, n_eval, ood_set, "")
    if tokens.table is not None:
        # The untrimmed models are timed and scored on their own tokenizer's ids of the same texts, in the
        # same order: the trimmed tokenizer splits a word whose tokens it dropped into more pieces, so the
        # shipped ids of a text are longer than the ones the usual tools (and the teacher) ever serve.
        orig, orig_segments = _eval_arrays(ctx, tokens.original, n_eval, ood_set, "orig_")
        if {k: v[:2] for k, v in orig_segments.items()} != {k: v[:2] for k, v in segments.items()}:
            raise StageError("the original and the trimmed tokenizer gave different evaluation rows")
        arrays.update(orig)
    token_counts = tokens.lengths(arrays, n_eval)
    start = max(b for _, b, _ in segments.values())
    arrays["eval_rows"] = np.arange(start)
    env = _environment(threads)
    isa, isa_why = optimum.choose_isa(env["cpu_flags"])

    with tempfile.TemporaryDirectory(prefix="edgekd-compare-") as tmp:
        work = Path(tmp)
        for b in batch_sizes:
            arrays[f"rows_b{b}"] = _timing_rows(n_eval, b, warmup, calls[b], seed + b)
        np.savez(work / "inputs.npz", **arrays)
        paths: dict[str, dict[str, Any]] = {}
        n_calib = 0
        for who, folder in students.items():
            # Each student calibrates on the ids it reads: the pruned one's are the trimmed tokenizer's.
            train = ctx.tokenized("train", tokens.original if who == "student" else tok)
            pick = np.random.default_rng(seed).permutation(len(train))[:calibration]
            c = train.collate(pick)
            calib = work / f"calib-{who}.npz"
            np.savez(calib, ids=c["input_ids"], mask=c["attention_mask"], lengths=train.lengths[pick])
            n_calib = len(pick)
            rec: dict[str, Any] = {"export": optimum.export_onnx(folder, work / f"{who}-optimum-onnx", timeout_s)}
            if rec["export"]["status"] == "ok":
                rec["quantize"] = optimum.quantize_onnx(work / f"{who}-optimum-onnx", work / f"{who}-optimum-int8",
                                                        isa, timeout_s)
                rec["openvino"] = openvino.quantize(Path(rec["export"]["path"]), work / f"{who}-openvino",
                                                    calib, n_calib, timeout_s)
            paths[who] = rec
        specs, skipped = _specs(run, students, entries, paths, torchao_compile=torchao == "compile",
                                trimmed=tokens.table is not None)

        job = {"models": specs, "threads": threads, "warmup": warmup, "runs": {str(b): n for b, n in calls.items()},
               "batch_sizes": list(batch_sizes), "inputs": "inputs.npz", "eval_batch_size": 32}
        if one_process:
            timing, outputs = _time_in_one_process(job, work, threads, timeout_s)
        else:
            timing, outputs = _time_in_rounds(specs, job, work, threads, timeout_s, rounds)
        mem: dict[str, Any] = {}
        for spec in specs if memory else []:
            if ((timing.get("models") or {}).get(spec["name"]) or {}).get("status") != "ok":
                continue
            if spec.get("compile"):
                mem[spec["name"]] = {"note": "not measured: a fresh process would compile the model again"}
                continue
            mjob = {"spec": spec, "threads": threads, "inputs": "inputs.npz", "batch_sizes": list(batch_sizes),
                    "rounds": min(MEMORY_ROUNDS, warmup + min(calls.values()))}
            mem[spec["name"]], _ = _child("memory", mjob, work, spec["name"], threads, timeout_s)
        rows = _assemble(specs, skipped, timing, outputs, mem, segments, ctx.task.metrics)
        by_name = {r["name"]: r for r in rows}
        student_row = by_name.get("student-fp32") or {}
        budget = recipe.quantize.max_accuracy_drop
        selection = None
        if artifact is None:
            # The choice reads validation figures only: validation accuracy picks the candidates, and
            # their p50 on validation texts (timed here, as the test rows were) picks among them.
            names = {r["name"] for r in report.candidates(rows, student_row.get("val_accuracy"), budget,
                                                          batch_sizes[0])}
            selection = _time_on_validation([s for s in specs if s["name"] in names], job, arrays, segments,
                                            batch_sizes[0], calls[batch_sizes[0]], seed, work, threads, timeout_s,
                                            rounds, one_process)
    for r in rows:
        if selection and r["name"] in selection["cases"]:
            r["val_cases"] = selection["cases"][r["name"]]
    best_name, why = report.select_best(rows, student_row.get("val_accuracy"), budget, batch_sizes[0], artifact)
    for r in rows:
        r["best"] = r["name"] == best_name
    refs = [by_name[n] for n in report.USUAL_PATHS if n in by_name]
    ablation_batch = ablation_batch_of(batch_sizes)
    data: dict[str, Any] = {
        "schema": 2,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run.name,
        "run_dir": str(run),
        "student": {"stage": "distill", "folder": str(student), "pruned": str(students.get("pruned") or "")},
        "settings": {"runs": {str(b): n for b, n in calls.items()}, "runs_given": runs is not None,
                     "warmup": warmup, "threads": threads, "batch_sizes": list(batch_sizes),
                     "ablation_batch": ablation_batch, "test_examples": n, "eval_examples": n_eval, "validation_examples": len(val),
                     "accuracy_budget": budget, "target_speedup": target_speedup, "artifact": artifact,
                     "optimum_isa": isa, "seed": seed, "calibration_texts": n_calib,
                     "inputs": INPUTS,
                     "tokenizers": token_counts,
                     "scoring": "dynamic int8 one text per call at its own length, as it is served; the other "
                                "models in length-sorted batches of 32",
                     "vocabulary": tokens.describe()},
        "ood": {**(ood_set.record() if ood_set else {}), "how": ood_how} if ood_set else {"how": ood_how},
        "environment": {**env, "timing_process": (timing or {}).get("environment")},
        "timing": _timing_record(timing),
        "optimum": {"isa": isa, "isa_why": isa_why, **{who: rec for who, rec in paths.items()}},
        "rows": rows,
        "ratios": {"vs_teacher": report.ratios(rows, report.TEACHER, list(batch_sizes)),
                   "vs_optimum_int8": report.ratios(rows, report.OPTIMUM_INT8, list(batch_sizes))},
        "best": {"name": best_name, "why": why, "student_val_accuracy": student_row.get("val_accuracy"),
                 "budget": budget, "shipped": shipped_artifact(RunFolder(run))[0],
                 "chosen_on": _chosen_on(artifact, selection, len(val))},
        # Only a comparison told to score no out-of-domain set (--ood none) leaves that bar out.
        "verdict": report.verdict_all(by_name.get(best_name) if best_name else None, refs, student_row,
                                      list(batch_sizes), target_speedup, ood_skipped=ood == "none"),
        "ablation": report.ablation(rows, manifest, ablation_batch, trimmed=tokens.table is not None),
        "paired": report.paired_all(by_name.get(best_name) if best_name else None, [*refs, student_row],
                                    segments["test"][2]),
        # the answers' key: each row's test_predictions are scored against these (seeds.py pools seeds with them)
        "test_labels": [int(y) for y in segments["test"][2]],
        "pipeline": report.pipeline_time(manifest),
    }
    png, no_plot = report.plot_png(data)
    data["plot"] = "compare.png" if png else f"not drawn: {no_plot}"
    data["compare_seconds"] = round(time.perf_counter() - started, 2)
    text = report.markdown(data)
    out.mkdir(parents=True, exist_ok=True)
    if png:
        atomic_write_bytes(out / "compare.png", png)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps(_finite(data), indent=2, default=str))
    data["markdown"] = text
    data["out_dir"] = str(out)
    return data


def _chosen_on(artifact: str | None, selection: dict[str, Any] | None, n_val: int) -> dict[str, Any]:
    """What the best artifact was chosen on, for compare.json: the split and its figures."""
    if artifact is not None:
        return {"split": None, "how": f"named with --artifact {artifact}: not chosen"}
    latency = {k: v for k, v in (selection or {}).items() if k != "cases"} or None
    return {"split": "validation", "accuracy": f"validation accuracy ({n_val} examples) within the budget of the "
            "fp32 student's", "latency": latency,
            "how": "the fastest p50 timed on validation texts (one plan of calls for every candidate) among the "
                   "export folders within the accuracy budget; no test figure is compared (a candidate needs only to have been "
                   "timed on test at that batch size, as the verdict reports that figure)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run folder, e.g. runs/default")
    p.add_argument("--runs", type=int, default=None,
                   help="timed calls per model and batch size (default: every test text timed once at each "
                        "batch size, ceil(n / b) calls of b texts)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs per model and batch size first (default 20)")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: this process's CPUs)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/compare)")
    p.add_argument("--artifact", default=None,
                   help="compare this export folder instead of the best one (e.g. onnx-int8); of the other "
                        "folders, only those its ablation steps start from are measured (onnx for onnx-int8)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes timed (default 1 8)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test examples (default: all)")
    p.add_argument("--target-speedup", type=float, default=1.5,
                   help="p50 speed-up over every usual path required (1.5)")
    p.add_argument("--ood", default=None, help="out-of-domain dataset asset (default: the recipe's eval.ood_dataset, "
                   "else amazon-snippets for negative/positive runs; 'none': skip)")
    p.add_argument("--calibration", type=int, default=300, help="training texts NNCF calibrates on (300)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model memory processes (faster)")
    p.add_argument("--torchao", choices=("compile", "eager"), default="compile",
                   help="run torchao under torch.compile (default, as its docs advise) or eager (no compile time)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds, each timing every model once in its own process on the next slice of the calls "
                        f"({ROUNDS})")
    p.add_argument("--one-process", action="store_true",
                   help="time every model in one process in rotating blocks (faster; runtimes share the process)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each child process (3600)")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the speed-up target is not met")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = compare(args.run_dir, args.out, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       batch_sizes=tuple(args.batch_sizes), artifact=args.artifact, eval_limit=args.eval_limit,
                       target_speedup=args.target_speedup, timeout_s=args.timeout, ood=args.ood,
                       calibration=args.calibration, memory=not args.no_memory, torchao=args.torchao,
                       rounds=args.rounds, one_process=args.one_process)
    except EdgeKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(data["markdown"])
    print(f"{data['verdict']['summary']}\nWritten to {data['out_dir']}: compare.md, compare.json"
          + (", compare.png" if data["plot"] == "compare.png" else f" (plot {data['plot']})"))
    return 1 if args.check and not data["verdict"]["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
