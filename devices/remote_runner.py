#!/usr/bin/env python3
"""Benchmark one exported artifact on this machine with stdlib, numpy and the artifact's runtime.

This file is copied next to an export folder on a device and run there, so it imports nothing
from edgekd. edgekd's local harness imports the same timing, statistics, input and environment
code from here, so a figure measured over SSH and one measured locally come from one
implementation.

    python3 remote_runner.py JOB.json RESULT.json

JOB.json names the export folder (``artifact.json`` inside), the (batch, sequence) cases,
warm-up and timed runs or a time budget, threads, ONNX Runtime providers, and optional
``.npz`` files of real inputs and of evaluation inputs whose outputs are written back.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

RESULT_SCHEMA = 1

# The ISA features that decide which inference kernels a runtime can use.
ISA_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "neon", "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",
)
LIBRARIES = (
    "numpy", "onnxruntime", "onnxruntime-gpu", "torch", "executorch", "tensorrt", "coremltools", "edgekd",
)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- the machine ------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_facts() -> dict:
    """CPU model, cores and flags from /proc/cpuinfo, else py-cpuinfo, else platform."""
    facts: dict = {"arch": platform.machine(), "logical_cores": os.cpu_count(), "model": None, "flags": []}
    text = _read("/proc/cpuinfo")
    if text:
        physical = set()
        phys_id = core_id = None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key in ("model name", "Model", "Hardware", "cpu model") and not facts["model"]:
                facts["model"] = value
            elif key in ("flags", "Features") and not facts["flags"]:
                facts["flags"] = value.split()
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                core_id = value
                physical.add((phys_id, core_id))
        if physical:
            facts["physical_cores"] = len(physical)
    if not facts["model"] or not facts["flags"]:
        try:
            import cpuinfo  # py-cpuinfo, where installed

            info = cpuinfo.get_cpu_info()
            facts["model"] = facts["model"] or info.get("brand_raw")
            facts["flags"] = facts["flags"] or list(info.get("flags", []))
        except Exception:  # absent or unsupported here: platform's answer below still holds
            pass
    facts["model"] = facts["model"] or platform.processor() or None
    cpufreq = "/sys/devices/system/cpu/cpu0/cpufreq"
    facts["governor"] = _read(f"{cpufreq}/scaling_governor")
    for key, name in (("cur_mhz", "scaling_cur_freq"), ("max_mhz", "cpuinfo_max_freq")):
        khz = _read(f"{cpufreq}/{name}")
        facts[key] = round(int(khz) / 1000) if khz and khz.isdigit() else None
    return facts


def isa_features(flags: list[str]) -> list[str]:
    have = set(flags)
    return [f for f in ISA_OF_INTEREST if f in have]


def memory_total_bytes() -> int | None:
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi reports them (empty where there is none)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append(dict(zip(("name", "driver", "memory", "sm_clock"), parts, strict=True)))
    return rows


def thread_record(requested: int | None) -> dict:
    rec = {"requested": requested, "env": {k: os.environ.get(k) for k in THREAD_ENV}}
    if hasattr(os, "sched_getaffinity"):
        rec["affinity"] = sorted(os.sched_getaffinity(0))
    if "torch" in sys.modules:
        rec["torch"] = sys.modules["torch"].get_num_threads()
    return rec


def environment(threads: int | None = None) -> dict:
    """Everything a timing depends on, recorded with every result."""
    cpu = cpu_facts()
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    env = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": {k: v for k, v in cpu.items() if k != "flags"},
        "isa": isa_features(cpu["flags"]),
        "memory_bytes": memory_total_bytes(),
        "gpus": gpus(),
        "libraries": versions,
        "threads": thread_record(threads),
    }
    if "onnxruntime" in sys.modules:
        env["onnxruntime_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return env


# --- memory -----------------------------------------------------------------------------------

# What a result's peak memory figure covers (``memory.peak_covers``): the same work in every row.
PEAK_COVERS = "load and timing"


def rss_bytes() -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak seen later is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
    except ImportError:
        return None


# --- timing and statistics --------------------------------------------------------------------


def summarize(times_s: list[float], batch: int) -> dict:
    """Latency percentiles (ms) and throughput (items/s) of timed runs of one batch size."""
    if not times_s:
        raise ValueError("no timed runs to summarize")
    t = np.asarray(times_s, dtype=np.float64) * 1000.0
    mean = float(t.mean())
    return {
        "runs": int(t.size),
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": mean,
        "std_ms": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "throughput": batch * 1000.0 / mean if mean > 0 else float("inf"),
    }


def time_calls(fn, warmup: int, runs: int, time_budget_s: float | None = None, min_runs: int = 5) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; with a time budget, keep
    going until the budget is spent (at least ``min_runs``, at most ``runs``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time_budget_s is not None and len(times) >= min_runs and time.perf_counter() - start >= time_budget_s:
            break
    return times


# --- inputs -----------------------------------------------------------------------------------


def case_inputs(io: dict, batch: int, seq: int, examples: dict | None = None,
                vocab_size: int = 100, seed: int = 0) -> dict:
    """Inputs of shape [batch, seq]: real preprocessed examples when given (cycled to fill the
    batch, truncated or padded to ``seq``), synthetic int64 ids otherwise."""
    names, dtypes = io["input_names"], io.get("dtypes", {})
    out = {}
    if examples:
        n = len(next(iter(examples.values())))
        rows = np.arange(batch) % n
        for name in names:
            a = np.asarray(examples[name])[rows]
            if seq is not None and a.ndim == 2 and a.shape[1] != seq:
                if a.shape[1] > seq:
                    a = a[:, :seq]
                else:
                    pad = np.zeros((a.shape[0], seq - a.shape[1], *a.shape[2:]), dtype=a.dtype)
                    a = np.concatenate([a, pad], axis=1)
            out[name] = np.ascontiguousarray(a.astype(dtypes.get(name, a.dtype), copy=False))
        return out
    rng = np.random.default_rng(seed)
    for name in names:
        dtype = np.dtype(dtypes.get(name, "int64"))
        if "mask" in name:
            out[name] = np.ones((batch, seq), dtype=dtype)
        elif "type" in name:
            out[name] = np.zeros((batch, seq), dtype=dtype)
        elif dtype.kind in "iu":
            out[name] = rng.integers(0, vocab_size, size=(batch, seq), dtype=dtype)
        else:
            raise ValueError(f"cannot make synthetic data for input '{name}' of dtype {dtype}: pass real examples")
    return out


def real_length_calls(io: dict, examples: dict, rows: np.ndarray) -> list[dict]:
    """One input dict per call: the example rows of ``rows[i]``, each batch cut to the longest real
    length among its rows (from the right-padded attention mask), as a server pads a batch."""
    if "attention_mask" not in examples:
        raise ValueError("timing at real lengths needs an attention_mask among the examples")
    names, dtypes = io["input_names"], io.get("dtypes", {})
    lengths = np.asarray(examples["attention_mask"]).sum(axis=1)
    calls = []
    for r in np.asarray(rows, dtype=np.int64):
        width = max(1, int(lengths[r].max()))
        call = {}
        for name in names:
            if name in examples:
                a = np.asarray(examples[name])[r, :width]
            elif "type" in name:  # a single-text classifier's token types are all zeros
                a = np.zeros((len(r), width), dtype=np.int64)
            else:
                raise ValueError(f"input '{name}' is not among the examples ({', '.join(sorted(examples))})")
            call[name] = np.ascontiguousarray(a.astype(dtypes.get(name, a.dtype), copy=False))
        calls.append(call)
    return calls


def inputs_sha256(calls: list[dict]) -> str:
    """sha256 of the arrays fed, call by call (names, dtypes, shapes and bytes): two rows of a table
    with the same value were timed on exactly the same inputs."""
    h = hashlib.sha256()
    for call in calls:
        _hash_call(h, call)
    return h.hexdigest()


def _hash_call(h, call: dict) -> None:
    for name in sorted(call):
        a = np.ascontiguousarray(call[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())


def prefix_sha256(calls: list[dict]) -> list[str]:
    """``inputs_sha256`` of the first 1, 2, ... calls: with a time budget each model stops after its own
    number of calls, and the parent keeps the first k of every model and needs the fingerprint of those."""
    h, out = hashlib.sha256(), []
    for call in calls:
        _hash_call(h, call)
        out.append(h.copy().hexdigest())
    return out


def static_shape_reason(meta: dict, batch: int, seq: int) -> str | None:
    """Why an artifact with static axes cannot run [batch, seq] (None when it can)."""
    io = meta["io"]
    dynamic = io.get("dynamic_axes", {})
    fixed_seq = meta.get("max_length")
    for name in io["input_names"]:
        axes = {int(k) for k in dynamic.get(name, {})}
        if 0 not in axes and batch != 1:
            return f"input '{name}' has a static batch size"
        if 1 not in axes and fixed_seq and seq != fixed_seq:
            return f"input '{name}' has a static sequence length of {fixed_seq}"
    # Targets that plan memory ahead (ExecuTorch, Core ML, TensorRT) record the bounds they accept.
    bounds = (meta.get("notes") or {}).get("bounds") or {}
    for axis, size in (("batch", batch), ("sequence", seq)):
        lo_hi = bounds.get(axis)
        if lo_hi and not lo_hi[0] <= size <= lo_hi[1]:
            return f"{axis} {size} is outside the artifact's bounds {lo_hi[0]}..{lo_hi[1]}"
    return None


def slice_rows(inputs: dict, start: int, stop: int) -> dict:
    return {k: np.ascontiguousarray(v[start:stop]) for k, v in inputs.items()}


# Precisions (artifact.json ``precision``) whose outputs for one row depend on the other rows of a
# call: ONNX Runtime's dynamic quantization takes one activation scale per tensor, padding included.
# edgekd serves them one request per call, so they are scored that way too (``run_dataset``).
ROW_DEPENDENT_PRECISIONS = {"int8-dynamic": "activation scales are computed per call over the whole batch"}


def concat_rows(outputs: list[dict]) -> dict:
    """One output dict from the outputs of one-row calls, in their order."""
    return {k: np.concatenate([np.asarray(o[k]) for o in outputs], axis=0) for k in (outputs[0] if outputs else {})}


def marked_lengths(inputs: dict) -> np.ndarray | None:
    """Each row's length up to its last marked token (``attention_mask``, right padding); None when
    the inputs have no 2-D mask (images)."""
    mask = inputs.get("attention_mask")
    if mask is None or np.ndim(mask) != 2:
        return None
    mask = np.asarray(mask)
    marked = mask != 0
    last = mask.shape[1] - np.argmax(marked[:, ::-1], axis=1)
    return np.where(marked.any(axis=1), last, mask.shape[1]).astype(np.int64)


def trimmed_rows(inputs: dict, idx: np.ndarray, width: int) -> dict:
    """Rows ``idx``, every 2-D array as wide as ``attention_mask`` cut to ``width`` columns."""
    full = np.asarray(inputs["attention_mask"]).shape[1]
    return {k: np.ascontiguousarray(np.asarray(v)[idx][:, :width] if np.ndim(v) == 2 and np.shape(v)[1] == full
                                    else np.asarray(v)[idx]) for k, v in inputs.items()}


def own_length_row(inputs: dict, i: int) -> dict:
    """Row ``i`` alone, as a server gets it: right-padded token inputs (every 2-D array as wide as
    ``attention_mask``) are cut to the width its mask marks; other inputs (images) are left whole."""
    row = slice_rows(inputs, i, i + 1)
    lengths = marked_lengths(row)
    return row if lengths is None else trimmed_rows(row, np.zeros(1, dtype=np.int64), int(lengths[0]))


def run_dataset(runner, inputs: dict, batch_size: int, one_row_each: bool = False,
                trim_ok: Callable[[int, int], bool] | None = None) -> dict:
    """Outputs of ``runner`` over every row of ``inputs``, batch by batch, in the rows' order. With
    ``one_row_each`` every row runs alone at its own length (``own_length_row``), as it is served.

    With ``trim_ok`` (batch, width) -> whether the runner takes that shape, token inputs are scored
    in batches of similar lengths, each cut to its longest text (padding is compute on CPU: the test
    texts average 26 tokens in a 64-wide split); a batch the runner cannot take at its width keeps the
    full width. Outputs with a sequence axis differ in width between batches: then the rows run in
    order at the full width instead, as without ``trim_ok``."""
    n = len(next(iter(inputs.values())))
    if one_row_each:
        return concat_rows([runner.run(own_length_row(inputs, i)) for i in range(n)])
    cap = getattr(runner, "max_batch", None)  # runtimes that plan memory ahead take no bigger batch
    batch_size = min(batch_size, cap) if cap else batch_size
    lengths = marked_lengths(inputs) if trim_ok is not None else None
    if lengths is not None and n:
        full = int(np.asarray(inputs["attention_mask"]).shape[1])
        order = np.argsort(lengths, kind="stable")
        out: dict = {}
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            width = max(1, int(lengths[idx].max()))
            res = runner.run(trimmed_rows(inputs, idx, width if trim_ok(len(idx), width) else full))
            for k, v in res.items():
                v = np.asarray(v)
                if k not in out:
                    out[k] = np.empty((n, *v.shape[1:]), dtype=v.dtype)
                if out[k].shape[1:] != v.shape[1:]:
                    return run_dataset(runner, inputs, batch_size)  # per-token outputs: not trimmed
                out[k][idx] = v
        return out
    parts: dict[str, list] = {}
    for start in range(0, n, batch_size):
        for k, v in runner.run(slice_rows(inputs, start, start + batch_size)).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def load_npz(path: str | None, base: Path) -> dict | None:
    if not path:
        return None
    with np.load(base / path) as z:
        return {k: z[k] for k in z.files}


# --- runners without edgekd ----------------------------------------------------------------------


class OrtRunner:
    """``disabled_optimizers``: the folder's own ``runtime_options`` (artifact.json), as edgekd's runner applies them."""

    def __init__(self, path: Path, io: dict, threads: int | None, providers: list[str] | None,
                 disabled_optimizers: list[str] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=providers or None,
                                            disabled_optimizers=disabled_optimizers or None)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.runtime = {"runtime": "onnxruntime", "providers": self.session.get_providers(),
                        "disabled_optimizers": list(disabled_optimizers or [])}

    def run(self, inputs: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class _TorchInputs:
    """Shared by the runtimes that take torch tensors in ``io.input_names`` order."""

    def _tensors(self, inputs: dict) -> list:
        torch = self.torch
        return [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]

    def _outputs(self, out) -> dict:
        out = out if isinstance(out, (list, tuple)) else [out]
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, out, strict=True)}


def set_executorch_threads(threads: int) -> tuple[int | None, str | None]:
    """Resize the ExecuTorch runtime's (process-wide) thread pool, as edgekd.export.executorch.set_threads
    does: (the size it reports afterwards, None), or (None, why not) where this runtime build has no
    Python binding for it. ExecuTorch sizes its own pool and reads no OMP_NUM_THREADS, so without the
    binding the bench's threads are not applied, and the row says so."""
    try:
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count,
            _unsafe_reset_threadpool,
        )
    except ImportError as e:  # a runtime build without these (experimental) bindings
        return None, f"this ExecuTorch runtime cannot set its thread count from Python ({e})"
    _unsafe_reset_threadpool(int(threads))
    got = int(_threadpool_get_thread_count())
    if got != threads:
        raise ValueError(f"The ExecuTorch runtime was asked for {threads} threads but runs {got}: set bench.threads "
                         "(or the profile's threads) to at most the number of the device's CPU cores.")
    return got, None


class ExecuTorchRunner(_TorchInputs):
    """``threads`` resizes the runtime's thread pool where the runtime allows it (else ``runtime`` records
    ``threads_not_applied``); ``max_batch`` is the batch the program's memory is planned for (None for a
    fixed-shape program), as edgekd's own ExecuTorch runner reads it, so scoring never asks for more."""

    def __init__(self, path: Path, io: dict, threads: int | None):
        import torch
        from executorch.runtime import Runtime

        self.torch = torch
        self.runtime = {"runtime": "executorch"}
        self.threads = None
        if threads:
            self.threads, why_not = set_executorch_threads(threads)
            if why_not:
                self.runtime["threads_not_applied"] = (f"{threads} thread(s) not applied: {why_not}; the runtime "
                                                       "ran on a pool of its own size")
        self.method = Runtime.get().load_program(path).load_method("forward")
        self.input_names, self.output_names = list(io["input_names"]), list(io["output_names"])
        meta = self.method.metadata
        planned = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(len(self.input_names))]
        dynamic = io.get("dynamic_axes") or {}
        static = not any(dynamic.get(n) for n in self.input_names)
        self.max_batch = None if static or not planned else min(s[0] for s in planned)

    def run(self, inputs: dict) -> dict:
        return self._outputs(self.method.execute(self._tensors(inputs)))


class TorchScriptRunner(_TorchInputs):
    def __init__(self, path: Path, io: dict, threads: int | None):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)  # this process exists only to benchmark this artifact
        if path.suffix == ".ptl":
            from torch.jit.mobile import _load_for_lite_interpreter

            self.module, kind = _load_for_lite_interpreter(str(path)), "torchscript-lite"
        else:
            self.module, kind = torch.jit.load(str(path)), "torchscript"
        self.input_names, self.output_names = list(io["input_names"]), list(io["output_names"])
        self.runtime = {"runtime": kind}

    def run(self, inputs: dict) -> dict:
        with self.torch.inference_mode():
            return self._outputs(self.module(*self._tensors(inputs)))


# The runtime each artifact file needs, imported before the load clock starts: a device's app has
# its runtime linked in already, so load time is the model's, not the library's.
RUNTIME_MODULES = {
    ".onnx": ("onnxruntime",), ".pte": ("torch", "executorch.runtime"), ".ptl": ("torch",), ".pt": ("torch",),
    ".engine": ("tensorrt",), ".plan": ("tensorrt",), ".mlpackage": ("coremltools",),
}


def preload(modules) -> dict:
    """Import ``modules`` (those missing are left to the loader's own error); returns the time taken."""
    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    return {"runtime_import_s": time.perf_counter() - t0, "preloaded": list(modules)}


# --- what edgekd.export.stage.load_artifact checks before it opens a folder ----------------------------
# Here again because this file runs on a device without edgekd; tests/devices/test_bench_refusals.py
# holds both to the same answers.


def read_meta(folder: Path) -> dict:
    """``folder``'s artifact.json as a dict; a missing or unreadable one is an error naming the file."""
    path = Path(folder) / "artifact.json"
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e}): copy the whole export folder, or re-export it") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-export this target (edgekd export)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object: re-export this target")
    return meta


def parity_refusal(meta: dict) -> str | None:
    """Why a folder whose parity check failed when it was exported (artifact.json ``parity.passed: false``)
    is not run, with its figures; None for any other folder. The export stage stops on the miss but leaves
    the folder for inspection: serve, the bench and ``edgekd.load`` refuse it, here and on a device."""
    parity = meta.get("parity")
    if not isinstance(parity, dict) or parity.get("passed") is not False:
        return None
    real = parity.get("real_lengths") or {}
    figures = ", ".join([*(f"{k} {parity[k]:.4g}" for k in ("top1_agreement", "max_abs_diff")
                           if isinstance(parity.get(k), (int, float))),
                         *(f"{k} {real[k]:.4g} at batch 1 and real lengths" for k in ("top1_agreement", "max_abs_diff")
                           if isinstance(real, dict) and isinstance(real.get(k), (int, float)))])
    return (f"failed its parity check against the source model when it was exported "
            f"({figures or 'see parity in its artifact.json'}): it does not answer as the model it was exported "
            "from. Re-export it (edgekd export) after fixing what failed")


def artifact_sha256(path: Path) -> str:
    """sha256 of an artifact as artifact.json records it (edgekd.export.stage.artifact_digest): of the file,
    or for a folder artifact of its files' hashes keyed by path relative to the folder's parent."""
    path = Path(path)

    def file_sha(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    if path.is_file():
        return file_sha(path)
    tree = {str(p.relative_to(path.parent)): file_sha(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def verify_standalone(folder: Path, meta: dict) -> None:
    """Refuse the folder as edgekd's loader does: a failed parity check, or an artifact whose sha256 is not
    the one in its artifact.json (it changed after export, or was copied only in part)."""
    why = parity_refusal(meta)
    if why:
        raise ValueError(f"{folder} {why}.")
    path = Path(folder) / meta["file"]
    if meta.get("sha256") and path.exists() and artifact_sha256(path) != meta["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in its artifact.json: it changed after export (or "
                         "was copied only in part). Re-export it, or copy the export folder again.")


def load_standalone(folder: Path, meta: dict, threads: int | None, providers: list[str] | None,
                    verify: bool = True):
    """A runner for the artifact in ``folder``, chosen by its file suffix. A folder that failed its parity
    check is refused; with ``verify`` (``run_job`` verifies before the load clock starts and passes False),
    so is an artifact that does not match its sha256."""
    if verify:
        verify_standalone(folder, meta)
    elif parity_refusal(meta):
        raise ValueError(f"{folder} {parity_refusal(meta)}.")
    path = folder / meta["file"]
    io = meta["io"]
    suffix = path.suffix
    if suffix == ".onnx":
        options = meta.get("runtime_options") or {}
        unknown = sorted(set(options) - {"disabled_optimizers"})
        if unknown:
            raise ValueError(f"artifact.json runtime_options {unknown} are not ONNX Runtime options this runner "
                             "knows (disabled_optimizers): re-export the folder with this edgekd version")
        disabled = list(options.get("disabled_optimizers") or [])
        if any(name != "SkipLayerNormFusion" for name in disabled):  # edgekd.export.onnx.TUNABLE_OPTIMIZERS
            raise ValueError(f"artifact.json disables optimisers {disabled}; only SkipLayerNormFusion is one edgekd "
                             "measures (ONNX Runtime would ignore an unknown name silently)")
        return OrtRunner(path, io, threads, providers, disabled)
    if suffix == ".pte":
        return ExecuTorchRunner(path, io, threads)
    if suffix in (".pt", ".ptl"):
        return TorchScriptRunner(path, io, threads)
    if suffix in (".engine", ".plan"):
        raise ValueError(
            f"'{meta['file']}' is a TensorRT engine, which only runs on the GPU model and TensorRT version "
            "it was built with: benchmark the onnx artifact with TensorrtExecutionProvider on the device, "
            "or build the engine there with trtexec."
        )
    raise ValueError(
        f"remote_runner cannot run '{meta['file']}' (target {meta.get('target')}): supported files are "
        ".onnx, .pte, .pt and .ptl. Core ML packages are measured with Xcode on the device."
    )


# --- the whole protocol for one artifact ----------------------------------------------------


def measure(load, job: dict, base: Path, meta: dict) -> tuple[dict, dict | None]:
    """Load with ``load()``, then time every case and run the evaluation inputs.

    Returns (result, eval_outputs). Memory is this process's RSS: the child or remote process
    exists only for this artifact, so nothing else pollutes it.
    """
    threads = job.get("threads")
    examples = load_npz(job.get("examples"), base)
    evals = load_npz(job.get("eval_inputs"), base)
    io = meta["io"]
    res: dict = {"schema": RESULT_SCHEMA, "name": job["name"], "status": "ok", "error": None}

    # In the caller's own process (bench.isolate: false) its memory is not the model's alone, and
    # resetting its peak-RSS mark would change what the caller later reads: measure nothing there.
    own_process = not job.get("in_process")
    rss0 = rss_bytes() if own_process else None
    if own_process:
        reset_peak_rss()
    t0 = time.perf_counter()
    runner = load()
    res["load_s"] = time.perf_counter() - t0
    rss_loaded = rss_bytes() if own_process else None
    res["runtime"] = runtime_info(runner)
    if meta.get("preload"):
        res["runtime"].update(meta["preload"])  # imported before the clock started, timed apart

    plan = load_npz(job.get("plan"), base)
    warmup = job.get("warmup", 10)
    cases = []
    first = True
    for batch, seq in job["cases"]:
        case = {"batch": batch, "seq": seq, "input": "real" if examples else "synthetic"}
        calls = None
        if seq == "real":
            if not examples or not plan or f"b{batch}" not in plan:
                case["error"] = "timing at real lengths needs real examples and a timing plan for this batch size"
                cases.append(case)
                continue
            calls = real_length_calls(io, examples, plan[f"b{batch}"])
            widths = sorted({next(iter(c.values())).shape[1] for c in calls})
            why = next((w for w in (static_shape_reason(meta, batch, n) for n in widths) if w), None)
            if why:
                why += "; real lengths need a dynamic sequence axis (or set bench.seq_lengths to time every model at one length)"
        else:
            why = static_shape_reason(meta, batch, seq)
        cap = getattr(runner, "max_batch", None)
        if not why and cap and batch > cap:
            why = f"batch {batch} is over the program's planned maximum batch {cap}"
        if why:
            case["skipped"] = why
            cases.append(case)
            continue
        try:
            if calls is None:
                calls = [case_inputs(io, batch, seq, examples, job.get("synthetic_vocab_size", 100), job.get("seed", 0))]
            timed = calls[warmup:] if len(calls) > warmup else calls
            case["inputs_sha256"] = inputs_sha256(timed)
            case["padding"] = "each batch padded to its longest text" if seq == "real" else f"every row at length {seq}"
            if seq == "real":
                tokens = [int(np.asarray(c["attention_mask"]).sum()) for c in timed]
                case.update(distinct_calls=len(timed), mean_tokens_per_item=float(np.mean(tokens)) / batch,
                            mean_width=float(np.mean([next(iter(c.values())).shape[1] for c in timed])))
            if first:
                t1 = time.perf_counter()
                runner.run(calls[0])
                res["first_inference_s"] = time.perf_counter() - t1
                res["first_inference_case"] = [batch, seq]
                first = False
            # The plan holds warm-up calls, then the timed ones: call i uses calls[i], so every model
            # times the same texts in the same order. A bench in rounds times one slice of the plan per
            # round: its timed calls start ``call_offset`` calls after the warm-up.
            offset = int(job.get("call_offset", 0))
            counter = itertools.chain(range(warmup), itertools.count(warmup + offset))
            times = time_calls(lambda calls=calls, counter=counter: runner.run(calls[next(counter) % len(calls)]),
                               warmup, job.get("runs", 50), job.get("time_budget_s"), job.get("min_runs", 5))
            case.update(summarize(times, batch))
            case["times_ms"] = [round(t * 1000.0, 6) for t in times]  # pooled over rounds by the parent
            if job.get("time_budget_s") is not None:
                # The calls this job timed, in order: the parent keeps as many of every model's as the
                # fewest any model timed, and fingerprints those (measure.equalize_timed_calls).
                case["timed_prefix_sha256"] = prefix_sha256(
                    [calls[(warmup + offset + i) % len(calls)] for i in range(len(times))])
        except Exception as e:  # one shape failing (e.g. longer than the model's positions) is recorded
            case["error"] = f"{type(e).__name__}: {e}"
        cases.append(case)
    res["cases"] = cases
    failed = [c["error"] for c in cases if "error" in c]
    if failed and not any("p50_ms" in c for c in cases):
        res.update(status="error", error=f"every case failed; the first: {failed[0]}")
    # The peak is read here, before any scoring: every row loads its model and times the same calls, but
    # scoring differs between rows (batches of eval_batch_size, one text per call for dynamic int8, none
    # for a model scored elsewhere), so a peak read after it would compare different work.
    peak = peak_rss_bytes() if own_process else None

    outputs = None
    if evals:
        t2 = time.perf_counter()
        fixed_batch = static_shape_reason(meta, 2, meta.get("max_length") or 0) is not None
        alone = str(meta.get("precision")) in ROW_DEPENDENT_PRECISIONS
        outputs = run_dataset(runner, evals, 1 if fixed_batch else job.get("eval_batch_size", 32), one_row_each=alone,
                              trim_ok=lambda b, w: static_shape_reason(meta, b, w) is None)
        if alone:
            res["eval_rows_per_call"] = (f"one text per call at its own length, as it is served ({meta['precision']}: "
                                         f"{ROW_DEPENDENT_PRECISIONS[str(meta['precision'])]})")
        res["eval_seconds"] = time.perf_counter() - t2
        res["eval_examples"] = len(next(iter(evals.values())))
    res["memory"] = {
        "rss_before_load_mb": _mb(rss0),
        "load_delta_mb": _mb(rss_loaded - rss0) if rss0 is not None and rss_loaded is not None else None,
        "peak_delta_mb": _mb(peak - rss0) if rss0 is not None and peak is not None else None,
        "peak_rss_mb": _mb(peak),
        "peak_covers": PEAK_COVERS,
    }
    if not own_process:
        res["memory"]["note"] = "not measured: the model ran inside the caller's process"
    res["environment"] = environment(threads)
    return res, outputs


def runtime_info(runner) -> dict:
    """What the runner says about itself: runtime, providers, device, threads."""
    info = dict(getattr(runner, "runtime", None) or {})
    info.setdefault("runner", type(runner).__name__)
    for attr in ("providers", "device", "threads"):
        value = getattr(runner, attr, None)
        if isinstance(value, (str, int, list, tuple)):
            info.setdefault(attr, list(value) if isinstance(value, tuple) else value)
    return info


def _mb(b: int | None) -> float | None:
    return None if b is None else round(b / 1e6, 2)  # MB = 10^6 bytes, as every size in the tables


def write_result(path: Path, result: dict, outputs: dict | None, outputs_path: Path | None) -> None:
    """Write outputs then the result, each to a temporary name renamed into place."""
    if outputs is not None and outputs_path is not None:
        tmp = outputs_path.with_name(outputs_path.name + ".tmp.npz")
        np.savez(tmp, **outputs)
        os.replace(tmp, outputs_path)
        result["eval_outputs"] = outputs_path.name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def run_job(job_path: Path, result_path: Path, load_factory=None, ready=None) -> int:
    """Read a job, measure, write the result; failures become a result with status 'error'.

    ``ready()``, when given, is called once the model's runtime is imported and before anything is loaded
    or timed: it returns when this process may go on (a process started ahead, while another is timed), or
    False when the caller no longer wants the measurement, which then ends here with nothing written."""
    job = json.loads(job_path.read_text())
    base = job_path.parent
    if job.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job["cpus"])
    result: dict = {"schema": RESULT_SCHEMA, "name": job.get("name"), "status": "error"}
    outputs = None
    try:
        if load_factory is None:
            folder = base / job["folder"]
            meta = read_meta(folder)
            # Verified here, before the clock starts: hashing is not part of loading a model on a device.
            verify_standalone(folder, meta)
            meta["preload"] = preload(RUNTIME_MODULES.get((folder / meta["file"]).suffix, ()))
            load = lambda: load_standalone(folder, meta, job.get("threads"), job.get("providers"),  # noqa: E731
                                           verify=False)
        else:
            load, meta = load_factory(job, base)
        process = None
        if ready is not None:
            ready_at = time.time()
            if not ready():
                return 3
            process = {"pid": os.getpid(), "ready_at": ready_at, "go_at": time.time()}
        result, outputs = measure(load, job, base, meta)
        if process is not None:
            result["process"] = process  # when it imported its runtime, and when it was let go
    except Exception as e:  # reported in the result file: the caller decides what a failure means
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=8)
        result["environment"] = environment(job.get("threads"))
    out_npz = result_path.with_name(result_path.stem + ".outputs.npz")
    write_result(result_path, result, outputs, out_npz)
    return 0 if result["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--env"]:
        print(json.dumps(environment(), default=str))
        return 0
    if len(argv) != 2:
        print("usage: remote_runner.py JOB.json RESULT.json  |  remote_runner.py --env", file=sys.stderr)
        return 2
    return run_job(Path(argv[0]), Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
