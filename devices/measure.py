"""Measure one model on this machine: latency per (batch, sequence) case, load and first-inference
time, memory, and the outputs on the test split from which accuracy is computed.

Each model runs in a fresh child process (``edgekd.devices.worker``) by default, so its memory
figures are its own and its threads are pinned through the child's environment; the timing
protocol itself is ``remote_runner.measure``, shared with remote devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.devices import remote_runner
from edgekd.errors import DataError, StageError
from edgekd.recipe import BenchConfig

MetricFn = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, float]]


@dataclass
class Inputs:
    """What every model in one bench is fed: real examples for timing (or None: synthetic ids),
    the evaluation inputs whose outputs give accuracy (the test rows, then the out-of-domain rows
    when given), and the timing plan: which example rows each timed call of each batch size uses.

    Every model of a bench gets the same plan, so every row of the table is timed on the same
    texts, lengths and padding; each case records the sha256 of the arrays it was fed."""

    examples: dict[str, np.ndarray] | None = None
    eval_inputs: dict[str, np.ndarray] | None = None
    plan: dict[str, np.ndarray] | None = None
    n_test: int | None = None
    ood_name: str | None = None

    @classmethod
    def from_config(cls, cfg: BenchConfig, eval_inputs: dict[str, np.ndarray] | None,
                    ood_inputs: dict[str, np.ndarray] | None = None, ood_name: str | None = None) -> Inputs:
        for what, data in (("eval_inputs", eval_inputs), ("ood_inputs", ood_inputs)):
            if data is not None:
                lengths = {len(v) for v in data.values()}
                if len(lengths) != 1 or 0 in lengths:
                    raise DataError(f"{what} must hold equally long, non-empty arrays; got lengths {sorted(lengths)}")
        if eval_inputs is not None and cfg.eval_examples:
            eval_inputs = {k: v[: cfg.eval_examples] for k, v in eval_inputs.items()}
        examples = plan = None
        n_test = len(next(iter(eval_inputs.values()))) if eval_inputs is not None else None
        if cfg.inputs == "real" and eval_inputs is not None:
            if real_lengths(cfg, eval_inputs):
                examples = eval_inputs  # every test text, each fed at its own length
                plan = {f"b{b}": timing_rows(n_test, b, cfg.warmup + cfg.runs) for b in cfg.batch_sizes}
            else:
                rows = max(cfg.batch_sizes)
                examples = {k: v[:rows] for k, v in eval_inputs.items()}
        if ood_inputs is not None and eval_inputs is not None:
            if set(ood_inputs) != set(eval_inputs):
                raise DataError(f"ood_inputs have inputs {sorted(ood_inputs)}, the test inputs {sorted(eval_inputs)}")
            eval_inputs = concat_padded(eval_inputs, ood_inputs)
        return cls(examples, eval_inputs, plan, n_test, ood_name if ood_inputs is not None else None)

    def width(self) -> int | None:
        """The sequence length of token inputs ([batch, seq]); None for images and other fixed shapes."""
        src = self.eval_inputs or self.examples
        if not src:
            return None
        a = next(iter(src.values()))
        return int(a.shape[1]) if a.ndim == 2 else None

    def fixed_shape(self) -> bool:
        """Inputs with no sequence axis (images [B,3,H,W]): timed per batch size only."""
        src = self.eval_inputs or self.examples
        return bool(src) and next(iter(src.values())).ndim > 2

    def write(self, workdir: Path) -> dict[str, str | None]:
        """Save as .npz beside the jobs; returns the file names a job refers to."""
        names: dict[str, str | None] = {"examples": None, "eval_inputs": None, "plan": None}
        for key in names:
            data = getattr(self, key)
            if data is not None:
                np.savez(workdir / f"{key}.npz", **data)
                names[key] = f"{key}.npz"
        return names

    def split_outputs(self, outputs: dict[str, np.ndarray] | None) -> tuple[dict | None, dict | None]:
        """(test outputs, out-of-domain outputs) of one model's outputs on ``eval_inputs``."""
        if outputs is None or self.n_test is None:
            return outputs, None
        test = {k: v[: self.n_test] for k, v in outputs.items()}
        ood = {k: v[self.n_test:] for k, v in outputs.items()} if self.ood_name else None
        return test, ood


def plan_sha256(rows: np.ndarray) -> str:
    """sha256 of a timing plan as text indices ([calls, batch]: which texts, in which order and batches):
    the same for every row of a bench, whichever tokenizer turns the texts into ids."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype=np.int64))
    return hashlib.sha256(f"{rows.shape}|".encode() + rows.tobytes()).hexdigest()


def real_lengths(cfg: BenchConfig, eval_inputs: dict[str, np.ndarray] | None) -> bool:
    """Whether the bench times each text at its own length: the default for token inputs with real
    examples (bench.inputs: real, no bench.seq_lengths)."""
    if cfg.seq_lengths or cfg.inputs != "real" or eval_inputs is None:
        return False
    a = next(iter(eval_inputs.values()))
    return a.ndim == 2 and "attention_mask" in eval_inputs


def timing_rows(n: int, batch: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` calls of ``batch`` example rows each ([count, batch]), every row used once before
    any repeats, in a seeded order: the same plan for every model of a bench."""
    rng = np.random.default_rng(seed + batch)
    need = count * batch
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return order.reshape(count, batch).astype(np.int64)


def concat_padded(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of ``a`` then rows of ``b``, token arrays right-padded with zeros to the wider of the two
    (zero ids under a zero attention mask change no output)."""
    out = {}
    for k, x in a.items():
        y = b[k]
        if x.ndim == 2 and y.ndim == 2 and x.shape[1] != y.shape[1]:
            w = max(x.shape[1], y.shape[1])
            x = np.pad(x, ((0, 0), (0, w - x.shape[1])))
            y = np.pad(y, ((0, 0), (0, w - y.shape[1])))
        out[k] = np.concatenate([x, y.astype(x.dtype, copy=False)], axis=0)
    return out


def cases(cfg: BenchConfig, max_length: int | None, fixed_shape: bool = False,
          real: bool | None = None) -> list[list[int | str | None]]:
    """(batch, sequence) pairs to time; sequence "real" for each text at its own length (the
    default with real examples), None for fixed-shape inputs such as images."""
    if fixed_shape:
        return [[b, None] for b in cfg.batch_sizes]
    if real is None:
        real = cfg.inputs == "real" and not cfg.seq_lengths
    if real and not cfg.seq_lengths:
        return [[b, "real"] for b in cfg.batch_sizes]
    seqs = cfg.seq_lengths or ([max_length] if max_length else None)
    if not seqs:
        raise StageError(
            "no sequence length to time: set bench.seq_lengths in the recipe, or pass eval inputs "
            "(their width is used), or bench artifacts whose artifact.json records max_length"
        )
    return [[b, s] for s in seqs for b in cfg.batch_sizes]


def common_length(entries: list[dict[str, Any]], inputs: Inputs) -> int | None:
    """The one sequence length every model is timed at when not at real lengths: the evaluation
    inputs' width, else the max_length the artifacts share (None when they disagree: then
    bench.seq_lengths must say)."""
    if inputs.width():
        return inputs.width()
    lens = {(e.get("meta") or {}).get("max_length") for e in entries if e.get("meta")} - {None}
    return lens.pop() if len(lens) == 1 else None


def bench_cases(cfg: BenchConfig, entries: list[dict[str, Any]], inputs: Inputs) -> list[list[int | str | None]]:
    """The one case list of a bench, locally and over ssh alike: the same lengths, padding and batches
    for every row of the table (real lengths only where the inputs carry a timing plan; else the
    common length of ``entries``, or bench.seq_lengths)."""
    return cases(cfg, common_length(entries, inputs), inputs.fixed_shape(), real=inputs.plan is not None)


def base_job(cfg: BenchConfig, name: str, threads: int, providers: list[str], cpus: list[int] | None,
             files: dict[str, str | None], case_list: list[list[int]]) -> dict[str, Any]:
    return {
        "name": name,
        "cases": case_list,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "min_runs": cfg.min_runs,
        "time_budget_s": cfg.time_budget_s,
        "threads": threads,
        "providers": providers or None,
        "cpus": cpus,
        "synthetic_vocab_size": cfg.synthetic_vocab_size,
        "eval_batch_size": cfg.eval_batch_size,
        **files,
    }


def child_env(threads: int | None) -> dict[str, str]:
    """The parent's environment with thread counts pinned: for the child only."""
    env = dict(os.environ)
    if threads:
        for var in remote_runner.THREAD_ENV:
            env[var] = str(threads)
    return env


def _job_paths(job: dict[str, Any], workdir: Path) -> tuple[Path, Path]:
    """The job's file and its result's (whose earlier round's copy the caller removes: ``_without_stale_result``)."""
    return workdir / f"job-{job['name']}.json", workdir / f"result-{job['name']}.json"


def _without_stale_result(result_path: Path) -> Path:
    """``result_path``, with the result (and its outputs) an earlier round left there removed: a process that
    dies before it writes one must not leave that round's figures to be read as its own."""
    for stale in (result_path, result_path.with_name(result_path.stem + ".outputs.npz")):
        stale.unlink(missing_ok=True)
    return result_path


def worker_command(job_path: Path, result_path: Path) -> list[str]:
    """The measuring process for one job (``edgekd.devices.worker``)."""
    return [sys.executable, "-m", "edgekd.devices.worker", str(job_path), str(result_path)]


def _exited_without_result(name: str, code: int | None, output: str) -> dict[str, Any]:
    tail = output.strip().splitlines()[-15:]
    return {"name": name, "status": "error", "error": f"the measuring process exited with code {code}: " + "\n".join(tail)}


def run_job(job: dict[str, Any], workdir: Path, isolate: bool, timeout_s: float) -> tuple[dict, dict | None]:
    """Run one job; returns (result, eval outputs). Failures come back as status 'error'."""
    job_path, result_path = _job_paths(job, workdir)
    _without_stale_result(result_path)
    if isolate:
        job_path.write_text(json.dumps(job, indent=2))
        cmd = worker_command(job_path, result_path)
        try:
            proc = subprocess.run(cmd, env=child_env(job.get("threads")), capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"name": job["name"], "status": "error", "error": f"timed out after {timeout_s:.0f} s"}, None
        if not result_path.is_file():
            return _exited_without_result(job["name"], proc.returncode, proc.stderr or proc.stdout or ""), None
    else:
        from edgekd.devices import worker

        # In this process CPU affinity is not pinned (that would change the caller); torch's thread
        # count is set to the bench's for the measurement, as every other row's is, and put back after.
        job = {**job, "cpus": None, "in_process": True}
        job_path.write_text(json.dumps(job, indent=2))
        with torch_threads_restored():
            remote_runner.run_job(job_path, result_path, load_factory=worker.load_factory)
    return read_result(result_path)


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# How a process started ahead is made from its job: (command line, without the ``--ready-fd FD`` that is
# added to it; the job's file; the result's file; the working folder or None). The command must accept
# ``--ready-fd FD`` last and, once its runtime is imported, call ``edgekd.devices.worker.ready_on(FD)``.
Spawn = Callable[[dict[str, Any], Path], tuple[list[str], Path, Path, Path | None]]


def _bench_spawn(job: dict[str, Any], workdir: Path) -> tuple[list[str], Path, Path, Path | None]:
    job_path, result_path = _job_paths(job, workdir)
    return worker_command(job_path, result_path), job_path, result_path, None


class _Started:
    """One measuring process started ahead: it imports its runtime, says so on a pipe, and waits for "go"."""

    def __init__(self, job: dict[str, Any], workdir: Path, spawn: Spawn | None = None):
        self.job, self.name = job, job["name"]
        cmd, job_path, result_path, cwd = (spawn or _bench_spawn)(job, workdir)
        self.result_path = _without_stale_result(result_path)  # never an earlier round's, read as this one's
        job_path.write_text(json.dumps(job, indent=2, default=str))
        self.log_path = workdir / f"log-{self.name}.txt"
        self.ready = self.timed_out = False
        self.started_at = time.time()
        read_fd, write_fd = os.pipe()
        with open(self.log_path, "wb") as log:  # the child's stdout and stderr: a file, never a full pipe
            self.proc = subprocess.Popen(
                [*cmd, "--ready-fd", str(write_fd)], cwd=cwd,
                env=child_env(job.get("threads")), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,))
        os.close(write_fd)
        self.pipe = os.fdopen(read_fd, "rb")

    def wait_ready(self, timeout_s: float) -> None:
        """Until the process has imported its runtime, has exited (its error is in its result or log), or
        ``timeout_s`` has passed (it is stopped)."""
        import select

        if select.select([self.pipe], [], [], timeout_s)[0]:
            self.ready = self.pipe.readline().strip() == b"ready"  # b"": it exited before it was ready
        else:
            self.timed_out = True
            self.close()

    def go(self, timeout_s: float) -> tuple[dict, dict | None]:
        """Let it load, time and score its model; its (result, eval outputs) as ``run_job`` gives them."""
        if self.timed_out:
            return {"name": self.name, "status": "error",
                    "error": f"timed out after {timeout_s:.0f} s importing its runtime"}, None
        try:
            if self.ready:
                self.proc.stdin.write(b"go\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            return {"name": self.name, "status": "error", "error": f"timed out after {timeout_s:.0f} s"}, None
        except BrokenPipeError:  # it exited before reading "go": its result or its log says why
            self.proc.wait(timeout=timeout_s)
        finally:
            for stream in (self.proc.stdin, self.pipe):  # (stdin is still open when it was never ready)
                with contextlib.suppress(OSError):
                    stream.close()
        ended_at = time.time()
        if not self.result_path.is_file():
            return _exited_without_result(self.name, self.proc.returncode,
                                          self.log_path.read_text(errors="replace")), None
        result, outputs = read_result(self.result_path)
        if isinstance(result.get("process"), dict):  # the span of its life, beside its own ready and go
            result["process"].update(started_at=self.started_at, ended_at=ended_at)
        return result, outputs

    def close(self) -> None:
        """Stop it, measured or not."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.pipe):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()


class Prestarted:
    """Measuring processes started a few at a time, ahead of their turn: a fresh process per model and round
    as ``run_job`` starts one, whose imports (torch and transformers take seconds, far longer than a model's
    timed calls) run side by side on this machine's cores while no model is timed. Each waits, idle, until
    its turn (``run``); only then does it load, time and score its model, with every other process of the
    round blocked on a read, so a model is timed as it would be alone.

    ``plan(jobs)`` gives a round's jobs in their order; ``run(job)`` starts that job with the next ``width - 1``
    of the plan (``width``: the CPUs the processes may use, by default this process's, at most ``cap``: each
    waiting process holds its imports in memory) when it has not been started yet, waits until they have all imported their runtimes, then lets it
    go. A job whose planned copy differs from the one run is started afresh. ``close()`` stops any left.
    ``spawn`` makes a job's process (``Spawn``; by default ``edgekd.devices.worker`` on the job's files)."""

    def __init__(self, workdir: Path, timeout_s: float, width: int | None = None, cap: int = 4,
                 spawn: Spawn | None = None):
        self.workdir, self.timeout_s, self.spawn = workdir, timeout_s, spawn
        self.width = max(1, min(width or usable_cpus(), cap))
        self.planned: list[dict[str, Any]] = []
        self.started: dict[str, _Started] = {}

    def plan(self, jobs: list[dict[str, Any]]) -> None:
        self.planned = list(jobs)

    def run(self, job: dict[str, Any]) -> tuple[dict, dict | None]:
        name = job["name"]
        child = self.started.pop(name, None)
        if child is not None and child.job != job:
            child.close()
            child = None
        self.planned = [j for j in self.planned if j["name"] != name]
        if child is None:
            ahead = [j for j in self.planned if j["name"] not in self.started][: self.width - 1]
            batch = []
            for j in [job, *ahead]:  # each tracked as soon as it runs, so close() stops it whatever follows
                batch.append(_Started(j, self.workdir, self.spawn))
                self.started[j["name"]] = batch[-1]
            for c in batch:
                c.wait_ready(self.timeout_s)
            child = self.started.pop(name)
        return child.go(self.timeout_s)

    def close(self) -> None:
        for child in self.started.values():
            child.close()
        self.started.clear()

    def __enter__(self) -> Prestarted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def imports_overlapping_timing(processes: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Pairs (i, j) of processes started ahead (each with started_at, ready_at, go_at, ended_at) where
    process i was still starting or importing its runtime while process j was let go and timed: none
    when every process waited as ``Prestarted`` means it to."""
    return [(i, j) for i, q in enumerate(processes) for j, p in enumerate(processes)
            if i != j and q["started_at"] < p["ended_at"] and q["ready_at"] > p["go_at"]]


@contextlib.contextmanager
def torch_threads_restored() -> Iterator[None]:
    """torch's intra-op thread count as it was before the block (a measurement in the caller's process
    pins it to the bench's threads), when torch is loaded."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def read_result(result_path: Path) -> tuple[dict, dict | None]:
    result = json.loads(result_path.read_text())
    outputs = None
    if result.get("eval_outputs"):
        with np.load(result_path.parent / result["eval_outputs"]) as z:
            outputs = {k: z[k] for k in z.files}
    return result, outputs


# A round's own per-call records, pooled or read by the parent and not kept in the results.
ROUND_ONLY = ("times_ms", "timed_prefix_sha256")
TIMING_KEYS = ("runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput")


def round_spans(runs: int, rounds: int) -> list[tuple[int, int]]:
    """(offset, runs) of each round: ``runs`` timed calls split into consecutive slices of the timing
    plan, one per round (fewer rounds than asked when there are fewer runs than rounds)."""
    rounds = max(1, min(rounds, runs))
    edges = [round(i * runs / rounds) for i in range(rounds + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(rounds)]


def round_job(job: dict[str, Any], cfg: BenchConfig, r: int, rounds: int, offset: int, runs: int) -> dict[str, Any]:
    """Round ``r`` (of ``rounds``) of one model's ``job``: its slice of the timed calls and of a time
    budget; the evaluation inputs in the first round only."""
    out = {**job, "runs": runs, "call_offset": offset,
           "time_budget_s": cfg.time_budget_s and cfg.time_budget_s / rounds}
    if r:
        out.pop("eval_inputs", None)
    return out


def round_order(todo: list[Any], r: int) -> list[Any]:
    """Round ``r``'s order: ``todo`` rotated by ``r``, reversed when ``r`` is odd, so each model takes
    another place in every round and the model timed right before it changes (with a rotation alone,
    neighbours stay neighbours in the same order)."""
    k = r % len(todo) if todo else 0
    order = todo[k:] + todo[:k]
    return order[::-1] if r % 2 else order


def in_rounds(todo: list[dict[str, Any]], runs: int, rounds: int,
              measure_one: Callable[[dict[str, Any], int, int, int], tuple[dict, dict | None]],
              on_skip: Callable[[], Any] | None = None,
              pick: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
              on_round: Callable[[list[dict[str, Any]], int, int, int], Any] | None = None) -> None:
    """Measure every entry of ``todo`` in ``rounds`` rounds, each round running every model once in a
    rotated order, reversed every other round (each in its own process where the bench isolates), so
    drift on a shared machine touches every row alike, no runtime shares a process with another, and
    no model always runs right after the same one (two processes of the same graph timed back to back
    in every round differed by about 5%: ``round_order``). ``measure_one(entry,
    round, offset, runs)`` runs one job (``round_job``): the timed calls of that slice of the plan,
    and the evaluation inputs in round 0 only. Fills each entry in place, its cases' timed calls
    pooled over the rounds. ``on_skip()`` is called for each job not run (a progress bar's step);
    ``pick(merged)`` chooses what of the merged result goes into the entry (``result_fields``).
    ``on_round(entries, round, offset, runs)`` is told, before each round, which entries it runs and in
    what order (``Prestarted.plan``)."""
    spans = round_spans(runs, rounds)
    results: dict[str, list[dict]] = {e["name"]: [] for e in todo}
    outputs: dict[str, dict | None] = {}

    def failed(e: dict[str, Any]) -> bool:  # in the first round: its error stands
        done = results[e["name"]]
        return bool(done) and done[0].get("status", "ok") != "ok"

    for r, (offset, n) in enumerate(spans):
        order = round_order(todo, r)
        if on_round is not None:
            on_round([e for e in order if not failed(e)], r, offset, n)
        for e in order:
            done = results[e["name"]]
            if failed(e):
                if on_skip is not None:
                    on_skip()
                continue
            result, out = measure_one(e, r, offset, n)
            done.append(result)
            if r == 0:
                outputs[e["name"]] = out
    equalize_timed_calls(results)
    for e in todo:
        e.update((pick or result_fields)(merge_rounds(results[e["name"]])))
        e["_outputs"] = outputs.get(e["name"])


def equalize_timed_calls(results: dict[str, list[dict[str, Any]]]) -> None:
    """With a time budget (``bench.time_budget_s``) each model stops after its own number of calls. Every
    model times the same plan in the same order, so in each round and case every model keeps its first
    k timed calls, k the fewest any model timed there; the case's figures are summarised again on those,
    and its fingerprint is that of those k calls (``timed_prefix_sha256``, written by the measuring
    process when a budget is set). Without a budget nothing changes."""
    by_case: dict[tuple[int, Any, Any], list[dict[str, Any]]] = {}
    for rounds in results.values():
        for r, result in enumerate(rounds):
            if result.get("status", "ok") != "ok":
                continue
            for case in result.get("cases") or []:
                if case.get("timed_prefix_sha256") and case.get("times_ms"):
                    by_case.setdefault((r, case.get("batch"), case.get("seq")), []).append(case)
    for cases in by_case.values():
        k = min(len(c["times_ms"]) for c in cases)
        for c in cases:
            c["times_ms"] = c["times_ms"][:k]
            c.update(remote_runner.summarize([t / 1000.0 for t in c["times_ms"]], int(c["batch"])))
            c["inputs_sha256"] = c.pop("timed_prefix_sha256")[k - 1]
            c["budget_kept_calls"] = k


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from one model's rounds: each case's timed calls pooled and summarised again, the
    rest (load, memory, evaluation, environment) from the first round, which also ran the evaluation."""
    first = dict(results[0])
    first.pop("process", None)
    if any(r.get("process") for r in results):  # one per round: each round's process, started ahead (Prestarted)
        first["processes"] = [r.get("process") for r in results]
    if len(results) == 1 or first.get("status", "ok") != "ok":
        first["cases"] = [{k: v for k, v in c.items() if k not in ROUND_ONLY} for c in first.get("cases") or []]
        return first
    failed = [f"round {n + 1}: {r.get('error')}" for n, r in enumerate(results) if r.get("status", "ok") != "ok"]
    cases = []
    for i, case in enumerate(first.get("cases") or []):
        merged = {k: v for k, v in case.items() if k not in ROUND_ONLY}
        parts = [(r.get("cases") or [{}] * (i + 1))[i] for r in results]
        errors = [p.get("error") for p in parts if p.get("error")] + failed
        if "times_ms" in case and not errors and all("times_ms" in p for p in parts):
            times = [t / 1000.0 for p in parts for t in p["times_ms"]]
            merged.update(remote_runner.summarize(times, int(case["batch"])), rounds=len(parts))
            if any("budget_kept_calls" in p for p in parts):
                # Each round kept its own first calls (equalize_timed_calls): the fingerprint is of them all.
                merged["inputs_sha256"] = hashlib.sha256(
                    "|".join(str(p.get("inputs_sha256")) for p in parts).encode()).hexdigest()
                merged["budget_kept_calls"] = sum(int(p.get("budget_kept_calls") or 0) for p in parts)
        elif errors and "skipped" not in case:
            # A figure from some rounds only would not be timed like the other rows: none at all.
            merged = {k: v for k, v in merged.items() if k not in TIMING_KEYS}
            merged["error"] = errors[0]
        cases.append(merged)
    first["cases"] = cases
    if failed:
        first.update(status="error", error=failed[0])
    return first


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The parts of a runner's result that go into a bench entry."""
    keep = ("status", "error", "load_s", "first_inference_s", "first_inference_case", "cases", "memory",
            "runtime", "environment", "eval_seconds", "eval_examples", "eval_rows_per_call", "threads", "processes")
    return {k: result[k] for k in keep if k in result}


def score(outputs: dict[str, np.ndarray] | None, labels: np.ndarray | None,
          metric_fn: MetricFn | None) -> dict[str, float] | None:
    """The task metrics of one model's outputs on the evaluation inputs (None when not given)."""
    if outputs is None or labels is None or metric_fn is None:
        return None
    n = len(next(iter(outputs.values())))
    return {k: float(v) for k, v in metric_fn(outputs, np.asarray(labels)[:n]).items()}


def reference_accuracies(run_dir: Path, given: dict[str, float] | None = None,
                         metric: str = "accuracy") -> dict[str, Any]:
    """Teacher and fp32-student ``metric`` to compare against: ``given`` when passed, else the run
    manifest's eval stage (``stages.eval.metrics``: ``teacher.<metric>``, ``student.<metric>``)."""
    if given:
        return {"teacher": given.get("teacher"), "student": given.get("student"), "source": "caller"}
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return {"teacher": None, "student": None, "source": None}
    metrics = json.loads(path.read_text()).get("stages", {}).get("eval", {}).get("metrics", {}) or {}

    def pick(who: str) -> float | None:
        v = metrics.get(f"{who}.{metric}")
        if v is None and isinstance(metrics.get(who), dict):
            v = metrics[who].get(metric)
        return float(v) if v is not None else None

    teacher, student = pick("teacher"), pick("student")
    source = "manifest:stages.eval.metrics" if teacher is not None or student is not None else None
    return {"teacher": teacher, "student": student, "source": source}


def same_examples_reference(ref: dict[str, Any], entries: list[dict[str, Any]], total: int | None) -> dict[str, Any]:
    """The reference the Δ columns read, on the examples the rows were scored on. The eval stage's
    teacher and student figures (``ref`` from the manifest) cover every test example; a bench that
    scored a subset (``bench.eval_examples``) reads its own ``pytorch-teacher``/``pytorch-student`` rows
    scored on that subset instead, and compares nothing where it has none."""
    if not str(ref.get("source") or "").startswith("manifest") or not total:
        return ref
    scored = {e.get("scored_examples") for e in entries if e.get("scored_examples")}
    if not scored or scored == {total}:
        return ref
    n = min(scored)
    own = {who: next((e["accuracy"] for e in entries if e.get("name") == f"pytorch-{who}"
                      and e.get("scored_examples") == n and e.get("accuracy") is not None), None)
           for who in ("teacher", "student")}
    if len(scored) == 1 and any(v is not None for v in own.values()):
        return {**own, "source": f"this bench's pytorch rows, scored on the same {n} of the {total} test examples "
                                 "(bench.eval_examples)"}
    return {"teacher": None, "student": None,
            "source": f"not compared: the rows were scored on {', '.join(map(str, sorted(scored)))} of the {total} "
                      "test examples (bench.eval_examples) and the eval stage's teacher and student on all of them; "
                      "bench the PyTorch teacher and student too, or drop bench.eval_examples"}


def deltas(accuracy: float | None, ref: dict[str, Any]) -> dict[str, float | None]:
    return {
        f"delta_vs_{who}": (accuracy - ref[who]) if accuracy is not None and ref.get(who) is not None else None
        for who in ("teacher", "student")
    }
