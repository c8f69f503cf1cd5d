"""Phones: benchmarked with the platform's own tool, not over SSH.

``prepare_on_device`` writes ``bench/<profile>/ON_DEVICE.md`` with the exact commands (ExecuTorch's
``executor_runner`` or benchmark app over adb; Xcode's Core ML performance report for iPhone) and
marks each artifact 'pending'. ``import_result`` reads the file the tool produced back into the
same results.json, CSV, table and plot as every other device.

Accepted result files: an executor_runner log, the ExecuTorch benchmark app's
``benchmark_results.json``, the filled-in Core ML template this module writes, or a result JSON of
``remote_runner.py`` run by hand on any device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.devices import measure, remote_runner, tables
from edgekd.devices.profiles import DeviceProfile, ManualConnection
from edgekd.errors import StageError
from edgekd.recipe import BenchConfig

DEVICE_DIR = "/data/local/tmp/edgekd"
XCODE_FORMAT = "edgekd-coreml-xcode/1"
TOOL_TARGET = {"adb": "executorch", "xcode": "coreml"}


def _adb(conn: ManualConnection) -> str:
    return f"adb -s {conn.serial}" if conn.serial else "adb"


def _static(meta: dict[str, Any]) -> bool:
    return not any(meta.get("io", {}).get("dynamic_axes", {}).get(n) for n in meta.get("io", {}).get("input_names", []))


def _adb_section(e: dict[str, Any], prof: DeviceProfile, cfg: BenchConfig, inputs: measure.Inputs,
                 files: dict[str, bytes], run_dir: Path) -> str:
    conn, name, meta = prof.connection, e["name"], e.get("meta") or {}
    adb, ddir = _adb(conn), f"{DEVICE_DIR}/{name}"
    artifact = Path(e["folder"]) / meta.get("file", "model.pte")
    threads = cfg.threads or prof.bench_threads()
    n = cfg.warmup + cfg.runs
    input_flags, push_inputs = "", []
    seq = meta.get("max_length") or inputs.width()
    bounds = (meta.get("notes") or {}).get("bounds") or {}
    if inputs.examples is not None and seq and (_static(meta) or bounds):
        # executor_runner reads raw little-endian files sized to the program's input shape: exactly
        # [1, seq] for a static program, the upper bound for a dynamic one (then resized to [1, seq]).
        rows, cols = (1, seq) if _static(meta) else (bounds.get("batch", [1, 1])[1], bounds.get("sequence", [1, seq])[1])
        data = remote_runner.case_inputs(meta["io"], rows, cols, inputs.examples)
        for k, v in data.items():
            rel = f"inputs/{name}/{k}.bin"
            files[rel] = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes()
            push_inputs.append(f"{adb} push {run_dir / 'bench' / prof.name / rel} {ddir}/")
        input_flags = " --inputs " + ",".join(f"{k}.bin" for k in data)
        if not _static(meta):
            input_flags += " --input_shapes " + ",".join(f"1x{seq}" for _ in data)
        shape = f"real test examples, timed at batch 1 x sequence {seq}"
        if not _static(meta):
            shape += (f" (files hold the program's upper bound, {rows} x {cols}; an executor_runner without "
                      "--input_shapes runs that whole bound shape: pass --batch/--seq to bench-import then)")
    else:
        shape = "inputs of ones at the program's upper-bound shape (executor_runner's default)"
    log = f"executor_runner-{name}.log"
    push = "\n".join([f"{adb} push {artifact} {ddir}/", *push_inputs])
    return f"""## {name} ({meta.get('precision', '?')}, {meta.get('file')})

Inputs: {shape}.

```sh
{adb} shell mkdir -p {ddir}
{push}
{adb} push executor_runner {DEVICE_DIR}/   # built for arm64-v8a with -DEXECUTORCH_BUILD_XNNPACK=ON
{adb} shell "cd {ddir} && {DEVICE_DIR}/executor_runner --model_path {artifact.name}{input_flags} \\
    --num_executions {n} --cpu_threads {threads}" > {log} 2>&1
edgekd bench-import {run_dir} --profile {prof.name} --name {name} --file {log}
```

The first {cfg.warmup} iterations are dropped as warm-up; the other {cfg.runs} are summarised (`edgekd bench-import`
refuses a log with fewer than {n} iterations: warm-up runs are never timed).
With ExecuTorch's benchmark app (extension/benchmark/android/benchmark) instead:

```sh
{adb} shell mkdir -p /data/local/tmp/minibench/{name} && {adb} push {artifact} /data/local/tmp/minibench/{name}/
{adb} shell am start -W -S -n org.pytorch.minibench/org.pytorch.minibench.BenchmarkActivity \\
    --es model_dir /data/local/tmp/minibench/{name} --ei num_iter {cfg.runs} --ei num_warm_up_iter {cfg.warmup}
{adb} shell run-as org.pytorch.minibench cat files/benchmark_results.json > benchmark_results-{name}.json
edgekd bench-import {run_dir} --profile {prof.name} --name {name} --file benchmark_results-{name}.json
```

The app reports the mean (and 10%-trimmed mean) latency, load time and PSS memory, not percentiles.
"""


def _xcode_section(e: dict[str, Any], prof: DeviceProfile, files: dict[str, bytes], run_dir: Path) -> str:
    name, meta = e["name"], e.get("meta") or {}
    template = f"coreml-{name}.result.json"
    files[template] = json.dumps({
        "format": XCODE_FORMAT, "name": name, "device": None, "os": None, "compute_units": "All",
        "load_median_ms": None, "prediction_median_ms": None, "notes": "",
    }, indent=2).encode()
    return f"""## {name} ({meta.get('precision', '?')}, {meta.get('file')})

1. Copy `{Path(e['folder']) / meta.get('file', 'model.mlpackage')}` to a Mac with Xcode 14 or newer and open it.
2. In the model's **Performance** tab press **+**, choose the attached iPhone and compute units **All**,
   and run the test. Repeat with **CPU Only** and **CPU and GPU** to see what the Neural Engine adds.
3. Copy the median **Load** and **Prediction** times (ms) into `{run_dir / 'bench' / prof.name / template}`,
   with the device model, iOS version and compute units, then:

```sh
edgekd bench-import {run_dir} --profile {prof.name} --file {run_dir / 'bench' / prof.name / template}
```
"""


def prepare_on_device(entries: list[dict[str, Any]], prof: DeviceProfile, cfg: BenchConfig, inputs: measure.Inputs,
                      run_dir: Path) -> dict[str, bytes]:
    """Mark what the phone must run as 'pending' and return ON_DEVICE.md and its input/template files."""
    conn = prof.connection
    if not isinstance(conn, ManualConnection):
        raise StageError(f"profile '{prof.name}' is not benchmarked on the device by hand")
    files: dict[str, bytes] = {}
    sections = []
    for e in entries:
        if e.get("status"):
            continue
        runtime = e.get("exporter", e["target"])
        if not prof.runs_target(runtime) or runtime != TOOL_TARGET[conn.tool]:
            e.update(status="skipped", reason=f"profile '{prof.name}' ({conn.tool}) does not run target '{e['target']}'")
            continue
        e.update(status="pending", reason="run it on the device: see ON_DEVICE.md, then `edgekd bench-import`")
        if conn.tool == "adb":
            sections.append(_adb_section(e, prof, cfg, inputs, files, run_dir))
        else:
            sections.append(_xcode_section(e, prof, files, run_dir))
    tool = "ExecuTorch over adb" if conn.tool == "adb" else "Xcode's Core ML performance report"
    body = "\n".join(sections) or (
        f"No export folder of this run has a '{TOOL_TARGET[conn.tool]}' artifact; export one first "
        f"(`edgekd export {run_dir} --to {TOOL_TARGET[conn.tool]}`).\n"
    )
    files["ON_DEVICE.md"] = f"# Benchmark on {prof.name} with {tool}\n\n{prof.description}\n\n{body}".encode()
    return files


# --- reading results back ---------------------------------------------------------------------------


def parse_executor_runner_log(text: str, warmup: int, runs: int | None = None) -> dict[str, Any]:
    """An executor_runner log's load time and per-iteration latencies: the first ``warmup`` iterations
    dropped, the rest summarised. A log with fewer than ``warmup + runs`` iterations (``runs`` None: one)
    is refused, saying how many executions to run, as ON_DEVICE.md does: warm-up is never timed."""
    load = re.search(r"Model loaded in ([\d.]+) ms", text)
    iters = [float(m) for m in re.findall(r"Iteration \d+ of \d+: ([\d.]+) ms", text)]
    total = re.search(r"Model executed successfully (\d+) time\(s\) in ([\d.]+) ms", text)
    if not iters and not total:
        raise StageError("not an executor_runner log: no 'Iteration ...' or 'Model executed successfully' line "
                         "(did the run fail? the log's last lines say why)")
    res: dict[str, Any] = {"status": "ok", "load_s": float(load.group(1)) / 1000 if load else None}
    case: dict[str, Any] = {"batch": 1, "seq": None}
    if iters:
        need = warmup + (runs or 1)
        if len(iters) < need:
            asked = f"{warmup} warm-up (bench.warmup) and {runs} timed (bench.runs)" if runs else \
                f"{warmup} warm-up (bench.warmup) and at least one timed"
            raise StageError(
                f"the executor_runner log has {len(iters)} iteration(s), and this bench takes {asked}: warm-up "
                f"runs are not timed. Run executor_runner with --num_executions {need} (the command in "
                "ON_DEVICE.md), then import its log.")
        res["first_inference_s"] = iters[0] / 1000
        timed = iters[warmup:]
        case.update(remote_runner.summarize([t / 1000 for t in timed], 1), warmup_dropped=warmup)
    else:
        runs, ms = int(total.group(1)), float(total.group(2))
        case.update(runs=runs, mean_ms=ms / runs, throughput=1000 * runs / ms,
                    note="this executor_runner prints only the total time: mean only, warm-up included")
    res["cases"] = [case]
    res["runtime"] = {"runtime": "executorch", "tool": "executor_runner"}
    return res


def parse_executorch_app(data: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """benchmark_results.json of ExecuTorch's Android benchmark app -> result per model name."""
    out: dict[str, dict[str, Any]] = {}
    for m in data:
        name = (m.get("benchmarkModel") or {}).get("name") or "model"
        res = out.setdefault(name, {"status": "ok", "cases": [{"batch": None, "seq": None}],
                                    "runtime": {"runtime": "executorch", "tool": "ExecuTorch benchmark app"},
                                    "environment": {"device": m.get("deviceInfo")}})
        metric, value = m.get("metric"), m.get("actualValue")
        if metric == "avg_inference_latency(ms)":
            res["cases"][0].update(mean_ms=value, throughput=1000 / value if value else None)
        elif metric == "trimmean_inference_latency(ms)":
            res["cases"][0]["trimmed_mean_ms"] = value
        elif metric == "model_load_time(ms)":
            res["load_s"] = value / 1000
        elif metric == "ram_pss_usage(mb)":
            res["memory"] = {"pss_delta_mb": value}
        elif metric == "load_status" and value:
            res.update(status="error", error=f"the app could not load the model (ExecuTorch error {int(value)})")
    for res in out.values():
        res["cases"][0]["note"] = "the benchmark app reports mean latency only, at the program's own input shape"
    return out


def parse_xcode_template(data: dict[str, Any]) -> dict[str, Any]:
    median = data.get("prediction_median_ms")
    if median is None:
        raise StageError("the Core ML result file has no prediction_median_ms: fill it in from Xcode's report")
    load = data.get("load_median_ms")
    return {
        "status": "ok", "load_s": load / 1000 if load is not None else None,
        "cases": [{"batch": 1, "seq": None, "p50_ms": median, "throughput": 1000 / median,
                   "note": "median from Xcode's Core ML performance report"}],
        "runtime": {"runtime": "coreml", "tool": "Xcode performance report", "compute_units": data.get("compute_units")},
        "environment": {"device": data.get("device"), "os": data.get("os"), "notes": data.get("notes")},
    }


def parse_result_file(path: Path, name: str | None, warmup: int, runs: int | None = None) -> dict[str, dict[str, Any]]:
    """{model name: result} from any accepted result file (``warmup``/``runs``: the bench's, which an
    executor_runner log must hold)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        parsed = parse_executorch_app(data)
        if name and len(parsed) == 1:
            parsed = {name: next(iter(parsed.values()))}
        return parsed
    if isinstance(data, dict) and data.get("format") == XCODE_FORMAT:
        return {name or data["name"]: parse_xcode_template(data)}
    if isinstance(data, dict) and "cases" in data and "status" in data:
        return {name or data["name"]: measure.result_fields(data)}
    if data is None:
        if not name:
            raise StageError("an executor_runner log does not name its model: pass --name (the export folder)")
        return {name: parse_executor_runner_log(text, warmup, runs)}
    raise StageError(f"{path} is not a result file edgekd reads (executor_runner log, benchmark_results.json, "
                     "the Core ML template, or a remote_runner result).")


def import_result(run_dir: str | Path, profile: str, file: str | Path, name: str | None = None,
                  batch: int | None = None, seq: int | None = None) -> dict[str, Any]:
    """Read a device's result file into ``run_dir/bench/<profile>/`` (results.json, csv, table, plot).

    ``name`` says which export folder the file measured (an executor_runner log does not say);
    ``batch``/``seq`` give the input shape where the tool ran another than ON_DEVICE.md asked for."""
    run_dir = Path(run_dir)
    out = run_dir / "bench" / profile
    if not (out / "results.json").is_file():
        raise StageError(f"No bench folder {out}: run `edgekd bench {run_dir} --profile {profile}` first; "
                         "it writes ON_DEVICE.md with the commands to run.")
    if not Path(file).is_file():
        raise StageError(f"Result file {file} does not exist.")
    data = json.loads((out / "results.json").read_text())
    parsed = parse_result_file(Path(file), name, data["config"].get("warmup", 0), data["config"].get("runs"))
    by_name = {e["name"]: e for e in data["results"]}
    unknown = sorted(set(parsed) - set(by_name))
    if unknown:
        raise StageError(f"{file} holds results for {unknown}, which are not models of this bench "
                         f"({', '.join(by_name)}); pass --name to say which export folder it measured.")
    ref = data.get("reference") or {}
    for n, res in parsed.items():
        e = by_name[n]
        for k in ("reason", "error", "cases", "memory", "load_s", "first_inference_s"):
            e.pop(k, None)
        for case in res.get("cases", []):
            case["batch"] = batch or case.get("batch")
            case["seq"] = seq or case.get("seq") or e.get("max_length")
        e.update(res)
        e["imported_from"] = Path(file).name
        e.update(measure.deltas(e.get("accuracy"), ref))
    tables.write_bench_dir(out, data, keep_existing=True)
    return {"profile": profile, "dir": str(out), "imported": sorted(parsed)}
