"""Child processes of ``compare_tools.py``; the parent never runs a model itself.

    python benchmarks/_compare_worker.py timing JOB.json RESULT.json
    python benchmarks/_compare_worker.py memory JOB.json RESULT.json

``timing`` loads the job's models into this process, pins torch's and ONNX Runtime's threads to the
same count, and times them on the same real test texts, in the same order and batches (one plan of
text indices), each model on its own tokenizer's ids of them (a trimmed vocabulary's model on the
trimmed tokenizer's, every other model on the original one's: the same text is not the same length
in both), in blocks that rotate through the models so that drift on a shared machine touches all of
them alike; then it scores every model on the evaluation rows, again on its own tokenizer's ids
(unless the job says ``evaluate: false``). Before the clock starts, every model runs each distinct
input shape of its slice of the plan once, untimed: a runtime that sets up per shape (OpenVINO)
pays that in no timed call. The parent sends one model per
process, in rounds (``call_offset``: this round's slice of the timed calls), or every model at once
(``--one-process``). ``memory`` loads one model in a fresh process and reports how much its RSS
grew (after load, and at the peak of load plus inference).

Thread counts come from the parent through the environment (OMP/MKL) and ``threads`` in the job;
this process exists only for the measurement, so setting torch's thread count here changes no
caller.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from _compare_models import Batches, feed, load, preload, timed_call

from edgekd.devices import remote_runner

# Untimed calls after switching to another model: the previous runtime's worker threads stop
# spinning, and the new one's caches are warm, before its clock starts.
SWITCH_WARMUP = 2
MAX_BLOCKS = 10


def _pin_torch_threads(threads: int | None, specs: list[dict[str, Any]]) -> None:
    needs_torch = any(s["kind"] in ("hf", "torchao") or Path(s.get("file") or "").suffix in (".pte", ".ptl")
                      for s in specs)
    if threads and needs_torch:
        import torch

        torch.set_num_threads(int(threads))
        torch.set_num_interop_threads(1)


def blocks(runs: int) -> list[tuple[int, int]]:
    """Split ``runs`` timed calls into up to MAX_BLOCKS contiguous blocks of near-equal size."""
    n = max(1, min(MAX_BLOCKS, runs // 10))
    edges = [round(i * runs / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _span(job: dict[str, Any], batch: int) -> tuple[int, int]:
    """(first timed call, timed calls) of this job at ``batch``: ``call_offset`` and ``runs`` are one
    number for every batch size or one per batch size (keyed by the batch size as text)."""

    def at(value: Any) -> int:
        return int(value[str(batch)] if isinstance(value, dict) else value)

    return at(job.get("call_offset", 0)), at(job["runs"])


def _vocab(spec: dict[str, Any]) -> str:
    """The tokenizer whose ids a model reads: ``original`` (a trimmed run's teacher, distilled student and
    the usual paths on it), else ``shipped`` (the run's own tokenizer, trimmed or not)."""
    return "original" if spec.get("vocab") == "original" else "shipped"


def _inputs_by_vocab(data: dict[str, np.ndarray]) -> dict[str, Batches]:
    """The evaluation texts as each tokenizer's ids, row i the same text in every one: ``shipped``
    (``ids``/``mask``/``lengths``) and, for a trimmed run, ``original`` (``orig_*``)."""
    out = {"shipped": Batches.from_npz(data)}
    if "orig_ids" in data:
        out["original"] = Batches(data["orig_ids"], data["orig_mask"], data["orig_lengths"])
    return out


def _own(inputs: dict[str, Batches], spec: dict[str, Any]) -> Batches:
    vocab = _vocab(spec)
    if vocab not in inputs:
        raise ValueError(f"{spec['name']} reads the {vocab} tokenizer's ids, and the inputs hold none")
    return inputs[vocab]


def plan_sha256(rows: np.ndarray) -> str:
    """sha256 of a plan's timed calls as text indices (which texts, in which order and batches): the same
    for every row of a comparison, whichever tokenizer turns the texts into ids."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype=np.int64))
    return hashlib.sha256(f"{rows.shape}|".encode() + rows.tobytes()).hexdigest()


def _load_all(specs: list[dict[str, Any]], threads: int | None) -> dict[str, dict[str, Any]]:
    """Every model loaded (a model failing to load is a record with its reason)."""
    models = {}
    for spec in specs:
        rec: dict[str, Any] = {"status": "ok", "error": None, "vocab": _vocab(spec)}
        try:
            preload(spec)
            t0 = time.perf_counter()
            runner, info = load(spec, threads)
            rec.update(load_s=time.perf_counter() - t0, runtime=remote_runner.runtime_info(runner), info=info,
                       runner=runner)
        except Exception as e:  # one model failing to load is a row with its reason, not a failed run
            rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        models[spec["name"]] = rec
    return models


def _one_of_each_shape(calls: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The first call of each distinct input shape, in the order they first come."""
    seen: dict[tuple, dict[str, np.ndarray]] = {}
    for x in calls:
        seen.setdefault(tuple((k, np.shape(v)) for k, v in sorted(x.items())), x)
    return list(seen.values())


def _time_case(models: dict[str, dict[str, Any]], inputs: dict[str, Batches], rows: np.ndarray, batch: int,
               warmup: int, runs: int, offset: int = 0) -> None:
    """Time every loaded model at one batch size; results go into each model's ``cases``. The timed
    calls are ``rows[warmup + offset:][:runs]``: a round's slice of the plan of text indices, the same
    plan for every model, each model fed its own tokenizer's ids of those texts (each batch padded to its
    longest text in that tokenization). Each case records the plan's sha256 (``plan_sha256``: every timed
    call of the plan, the same in every round and row), the tokenizer, and the sha256 of the arrays the
    model was fed (``inputs_sha256``, the same for every row of that tokenizer). Before any clock starts,
    each model runs the warm-up calls, then one call of each distinct shape of its slice (untimed)."""
    base = {v: [b.batch(r) for r in rows] for v, b in inputs.items()
            if any(m["vocab"] == v and m["status"] == "ok" for m in models.values())}
    plan = plan_sha256(rows[warmup:])
    prepared: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, m in models.items():
        case = {"batch": batch}
        m.setdefault("cases", []).append(case)
        if m["status"] != "ok":
            continue
        try:
            if m["vocab"] not in base:
                raise ValueError(f"the inputs hold no {m['vocab']} tokenizer's ids for this model")
            prepared[name] = [feed(m["runner"], x) for x in base[m["vocab"]]]
            for i in range(warmup):
                m["runner"].run(prepared[name][i])
            shapes = _one_of_each_shape(prepared[name][warmup + offset:warmup + offset + runs])
            for x in shapes:
                m["runner"].run(x)
            case["shapes_warmed"] = len(shapes)
        except Exception as e:  # e.g. a batch size the artifact was not built for
            case["error"] = f"{type(e).__name__}: {e}"
            prepared.pop(name, None)
    for name, xs in prepared.items():
        # What this model is fed in the plan's timed calls (token types a graph adds are zeros, not data).
        fed = [{k: v for k, v in x.items() if k in ("input_ids", "attention_mask")} for x in xs[warmup:]]
        lengths = inputs[models[name]["vocab"]].lengths
        models[name]["cases"][-1].update(
            inputs_sha256=remote_runner.inputs_sha256(fed), plan_sha256=plan, tokenizer=models[name]["vocab"],
            mean_tokens_per_item=float(lengths[np.asarray(rows[warmup:], dtype=np.int64)].mean()))
    wall: dict[str, list[float]] = {n: [] for n in prepared}
    cpu: dict[str, list[float]] = {n: [] for n in prepared}
    names = list(prepared)
    for k, (start, stop) in enumerate(blocks(runs)):
        order = names[k % len(names):] + names[: k % len(names)] if names else []
        for name in order:
            if name not in prepared:
                continue
            runner, xs = models[name]["runner"], prepared[name]
            try:
                for j in range(SWITCH_WARMUP):
                    runner.run(xs[j % max(warmup, 1)])
                for i in range(start, stop):
                    w, c = timed_call(runner, xs[warmup + offset + i])
                    wall[name].append(w)
                    cpu[name].append(c)
            except Exception as e:
                models[name]["cases"][-1]["error"] = f"{type(e).__name__}: {e}"
                prepared.pop(name)
    for name in names:
        case = models[name]["cases"][-1]
        if name in prepared and wall[name]:
            case.update(remote_runner.summarize(wall[name], batch))
            case["cpu_p50_ms"] = float(np.percentile(np.asarray(cpu[name]) * 1000.0, 50))
            # Pooled with the other rounds' by the parent (edgekd.devices.measure.merge_rounds).
            case["times_ms"] = [round(t * 1000.0, 6) for t in wall[name]]
            case["cpu_times_ms"] = [round(t * 1000.0, 6) for t in cpu[name]]


def _evaluate(runner: Any, batches: Batches, eval_rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for ``eval_rows`` in their order; batches of similar lengths (less padding)."""
    order = np.argsort(batches.lengths[eval_rows], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        res = runner.run(feed(runner, batches.batch(eval_rows[pos])))
        logits = np.asarray(res["logits"] if "logits" in res else next(iter(res.values())))
        if out is None:
            out = np.empty((len(eval_rows), *logits.shape[1:]), dtype=np.float32)
        out[pos] = logits
    return out if out is not None else np.empty((0,), dtype=np.float32)


def timing(job: dict[str, Any], base: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    threads = job.get("threads")
    _pin_torch_threads(threads, job["models"])
    with np.load(base / job["inputs"]) as z:
        data = {k: z[k] for k in z.files}
    inputs = _inputs_by_vocab(data)
    models = _load_all(job["models"], threads)
    specs = {s["name"]: s for s in job["models"]}
    # Dynamic int8 (rows depend on each other through the call's activation scale) is scored one text
    # per call at its own length, as it is served; every other model in length-sorted batches.
    alone = {s["name"] for s in job["models"] if s.get("rows_alone")}
    t0 = time.perf_counter()
    for b in job["batch_sizes"]:
        rows = data[f"rows_b{b}"]
        offset, runs = _span(job, b)
        if job["warmup"] + offset + runs > len(rows):
            raise ValueError(f"the plan holds {len(rows)} calls at batch {b}: no room for {job['warmup']} warm-up "
                             f"calls and timed calls {offset}..{offset + runs - 1}")
        _time_case(models, inputs, rows, b, job["warmup"], runs, offset)
    timing_s = time.perf_counter() - t0
    outputs = {}
    for name, m in models.items():
        if m["status"] != "ok" or not job.get("evaluate", True):
            continue
        e0 = time.perf_counter()
        try:
            # Scoring, as timing: each model on its own tokenizer's ids of the same texts.
            outputs[name] = _evaluate(m["runner"], _own(inputs, specs[name]), data["eval_rows"],
                                      1 if name in alone else job["eval_batch_size"])
            m["eval_seconds"] = time.perf_counter() - e0
        except Exception as e:
            m["eval_error"] = f"{type(e).__name__}: {e}"
    result = {
        "models": {n: {k: v for k, v in m.items() if k not in ("runner", "vocab")} for n, m in models.items()},
        "timing_seconds": timing_s,
        "blocks": {str(b): blocks(_span(job, b)[1]) for b in job["batch_sizes"]},
        "switch_warmup": SWITCH_WARMUP,
        "environment": remote_runner.environment(threads),
    }
    return result, outputs


def _state_dict_bytes(runner: Any) -> int:
    """Bytes of ``torch.save(state_dict)``: the checkpoint a torchao user would ship."""
    import torch

    buf = io.BytesIO()
    torch.save(runner.module.state_dict(), buf)
    return len(buf.getvalue())


def memory(job: dict[str, Any], base: Path) -> dict[str, Any]:
    spec, threads = job["spec"], job.get("threads")
    _pin_torch_threads(threads, [spec])
    with np.load(base / job["inputs"]) as z:
        data = {k: z[k] for k in z.files}
    batches = _own(_inputs_by_vocab(data), spec)  # its own tokenizer's ids, as it is timed
    preloaded = preload(spec)
    gc.collect()
    rss0 = remote_runner.rss_bytes()
    peak_reset = remote_runner.reset_peak_rss()
    t0 = time.perf_counter()
    runner, _ = load(spec, threads)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_loaded = remote_runner.rss_bytes()
    calls = 0
    for b in job["batch_sizes"]:
        for rows in data[f"rows_b{b}"][: job["rounds"]]:
            runner.run(feed(runner, batches.batch(rows)))
            calls += 1
    peak = remote_runner.peak_rss_bytes()
    res: dict[str, Any] = {
        "status": "ok",
        "load_s": load_s,
        "calls": calls,
        "preloaded": preloaded,
        "rss_before_load_mb": _mb(rss0),
        "load_delta_mb": _mb(rss_loaded - rss0) if rss0 is not None and rss_loaded is not None else None,
        "peak_delta_mb": _mb(peak - rss0) if rss0 is not None and peak is not None and peak_reset else None,
        "peak_rss_mb": _mb(peak),
    }
    if not peak_reset:
        res["note"] = "this kernel cannot reset the peak-RSS mark: peak delta not measured"
    if spec["kind"] == "torchao":
        res["size_bytes"] = _state_dict_bytes(runner)
    return res


def _mb(b: int | None) -> float | None:
    return None if b is None else round(b / 1e6, 2)  # MB = 10^6 bytes, as every size in the tables


def _wait_for_turn(job: dict[str, Any], ready: Any) -> dict[str, Any] | None:
    """A timing process started ahead of its turn (``--ready-fd``, ``edgekd.devices.measure.Prestarted``):
    import every runtime its models need, then say so and wait, idle, for "go" before anything is loaded
    or timed. Returns its pid and when it was ready and let go (kept in the result as ``process``, so the
    parent can check that no import overlapped a timed model), or None when the parent no longer wants
    the measurement."""
    import os

    for spec in job["models"]:
        preload(spec)
    ready_at = time.time()
    if not ready():
        return None
    return {"pid": os.getpid(), "ready_at": ready_at, "go_at": time.time()}


def main(argv: list[str]) -> int:
    ready = None
    if len(argv) == 5 and argv[0] == "timing" and argv[3] == "--ready-fd" and argv[4].isdigit():
        from edgekd.devices.worker import ready_on

        ready, argv = ready_on(int(argv[4])), argv[:3]
    if len(argv) != 3 or argv[0] not in ("timing", "memory"):
        print("usage: _compare_worker.py {timing JOB.json RESULT.json [--ready-fd FD] | memory JOB.json RESULT.json}",
              file=sys.stderr)
        return 2
    mode, job_path, result_path = argv[0], Path(argv[1]), Path(argv[2])
    job = json.loads(job_path.read_text())
    outputs, process = None, None
    try:
        if ready is not None:
            process = _wait_for_turn(job, ready)
            if process is None:
                return 3  # not wanted: nothing written
        if mode == "timing":
            result, outputs = timing(job, job_path.parent)
        else:
            result = memory(job, job_path.parent)
    except Exception as e:  # reported in the result file; the parent decides what it means
        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    if process is not None:
        result["process"] = process
    out_npz = result_path.with_name(result_path.stem + ".outputs.npz")
    remote_runner.write_result(result_path, result, outputs, out_npz)
    return 0 if result.get("status", "ok") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
