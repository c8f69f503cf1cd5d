"""Load test of the inference server against its own runner, on loopback only.

    edgekd export-teacher runs/default      # the teacher-sized model, beside the students
    python benchmarks/load_test.py runs/default/served-teacher/onnx runs/default/export/onnx-int8 \\
        runs/default/export/onnx --requests 20000 --duration 8 --rounds 4 --out load.json

Measures, in one run and side by side:
  1. the raw runner in this process (batch 1 and batch 32, pre-tokenised; and tokenise + run at
     batch 1: the same work a /predict request asks of the server), before and after the HTTP phases;
  2. the server (``edgekd.serving.serve`` in a child process on a free 127.0.0.1 port; one with
     batching off and one with batching on, both started up front) at 1 and 32 concurrent
     closed-loop clients on keep-alive connections, plus the HTTP floor (GET /v2/health/live).

The client is ``wrk`` (a C load generator, with ``_wrk_post.lua`` for the POST bodies, the request
bound and the status counts) when it is on PATH, else a lean asyncio client in this process (raw
streams, keep-alive HTTP/1.1, pre-encoded requests, responses read by Content-Length); ``--client``
picks one. The report says which one ran. The client's own cost is part of every latency measured.

It prints a Markdown table with p50/p99 latency, throughput, 5xx and lost requests, plus the ratios
the serving issue sets targets for: the HTTP overhead at p50 (unbatched server, 1 client, minus the
raw runner's tokenise + run p50; <= 1 ms) and batched over unbatched throughput at 32 clients (>= 2x,
bounded by the runner's own batch-32 over batch-1 gain, printed beside it).

Other work sharing the machine moves every figure, and its load drifts: each phase therefore runs
in --rounds slices, interleaved with the other phases and with passes of the raw runner, and each
row pools its slices (requests and time summed, latency percentiles over all answers together; the
figures of each round are kept in the JSON). The load average is recorded before and after.

Lost requests: those the client sent and never got an answer to (socket errors, timeouts), checked
against the server's own request counter (/metrics): wrk stops at its bound with up to one request
in flight per connection; those count as abandoned, not lost, only when the server finished them.
Every phase is bounded by --requests and --duration in all, and the child servers are stopped
(SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TEXTS = [
    "a warm, funny and moving film with a great cast",
    "the plot is dull and the acting is flat",
    "not bad, but far too long for such a thin story",
    "one of the most beautiful films of the year",
    "I wanted to like it, yet it never comes alive",
    "brilliant direction, lovely score, and a story that stays with you",
    "a tedious, messy script that wastes its actors",
    "fine fun for a Saturday afternoon",
]
BODIES = [json.dumps({"text": t}).encode() for t in TEXTS]
PREDICT = ("POST", "/predict")
FLOOR = ("GET", "/v2/health/live")
WRK_SCRIPT = Path(__file__).resolve().with_name("_wrk_post.lua")
CLIENT_TIMEOUT_S = 30.0
PAYS = 1.1  # batched over unbatched throughput from which batching is worth turning on

SERVER = """
import sys
from edgekd.serving import ServeSettings, serve
serve(sys.argv[1], None, ServeSettings.model_validate_json(sys.argv[2]), loader={loader})
"""


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _wpct(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The q-th percentile of values carrying weights (the smallest value with q% of the weight at
    or below it): how slices of a phase are pooled."""
    if not len(values):
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, q / 100 * cum[-1], side="left"))
    return float(values[order][min(i, len(values) - 1)])


def _load(folder: Path, threads: int | None, loader_name: str):
    opts = {"threads": threads} if threads else {}
    if loader_name == "registry":
        return registry_loader(folder, **opts)
    from edgekd.serving.model import default_loader

    return default_loader(folder, **opts)


def registry_loader(folder: Path, **opts: Any):
    """Load through the export target's own ``Exporter.load`` (the registry), without the stage."""
    import importlib

    from edgekd.export.base import get_exporter, read_artifact_meta

    meta = read_artifact_meta(folder)
    name = str(meta.get("exporter") or meta.get("target"))
    importlib.import_module(f"edgekd.export.{name.split('-')[0]}")
    return get_exporter(name).load(Path(folder) / meta["file"], **opts), meta


# --- the raw runner ------------------------------------------------------------------------------------
class RawRunner:
    """The artifact's runner in this process, fed the same texts as the server, without HTTP."""

    def __init__(self, folder: Path, threads: int | None, loader_name: str):
        from edgekd.serving.codec import label_names
        from edgekd.tasks.text.codec import TextCodec

        self.runner, meta = _load(folder, threads, loader_name)
        self.codec = TextCodec.from_folder(
            folder, max_length=int(meta.get("max_length") or 128), overflow="truncate",
            input_names=list(self.runner.input_names), labels=label_names(meta),
        )
        self.singles = [self.codec.pad(self.codec.encode([t])) for t in TEXTS]
        self.batch32 = self.codec.pad(self.codec.encode([TEXTS[i % len(TEXTS)] for i in range(32)]))
        for x in self.singles:  # warm-up
            self.runner.run(x)
        self.runner.run(self.batch32)

    def sample(self, seconds: float, n: int) -> dict[str, list[float]]:
        """Batch-1 latency pre-tokenised (runner) and with tokenising (tokenize_run: encode, pad and
        run, the work the server does for one /predict text); batch-32 calls, pre-tokenised. Taken
        in interleaved rounds (32 of each batch-1 kind, then one batch of 32), so that load from
        other work drifting meanwhile moves all three alike; at most ``n`` batch-1 calls of each."""
        run, codec = self.runner.run, self.codec
        perf = time.perf_counter
        out: dict[str, list[float]] = {"runner": [], "tokenize_run": [], "batch32": []}
        end = time.monotonic() + seconds
        i = 0
        while i < n and (time.monotonic() < end or not out["batch32"]):
            for j in range(i, min(i + 32, n)):
                t = perf()
                run(self.singles[j % len(self.singles)])
                out["runner"].append(perf() - t)
            for j in range(i, min(i + 32, n)):
                t = perf()
                run(codec.pad(codec.encode([TEXTS[j % len(TEXTS)]])))
                out["tokenize_run"].append(perf() - t)
            t = perf()
            run(self.batch32)
            out["batch32"].append(perf() - t)
            i += 32
        return out


def summarize_raw(passes: list[dict[str, list[float]]], runner: str) -> dict[str, Any]:
    """Pooled over the passes taken before and after the HTTP phases, so load drifting on a shared
    machine shows up in the spread (``*_per_pass``) instead of biasing one side."""
    pooled = {k: [x for p in passes for x in p[k]] for k in passes[0]}
    return {
        "runner_p50_ms": _pct(pooled["runner"], 50) * 1e3, "runner_p99_ms": _pct(pooled["runner"], 99) * 1e3,
        "runner_p50_ms_per_pass": [_pct(p["runner"], 50) * 1e3 for p in passes],
        "tokenize_run_p50_ms": _pct(pooled["tokenize_run"], 50) * 1e3,
        "tokenize_run_p99_ms": _pct(pooled["tokenize_run"], 99) * 1e3,
        "tokenize_run_p50_ms_per_pass": [_pct(p["tokenize_run"], 50) * 1e3 for p in passes],
        "batch32_ms": float(np.median(pooled["batch32"])) * 1e3,
        # Throughputs from total time over total texts (not from medians): a 32-text call takes in
        # the interruptions of a shared machine that the median of short calls leaves out.
        "batch1_texts_per_s": len(pooled["runner"]) / float(np.sum(pooled["runner"])),
        "batch32_texts_per_s": 32 * len(pooled["batch32"]) / float(np.sum(pooled["batch32"])),
        "runner": runner, "calls": len(pooled["runner"]),
    }


# --- the server ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


_SAMPLE = re.compile(r'^(edgekd_[a-z_]+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class ServerProcess:
    """``edgekd.serving.serve`` in a child process, on a free loopback port."""

    def __init__(self, folder: Path, settings: dict[str, Any], loader_name: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {**settings, "host": "127.0.0.1", "port": self.port, "log_level": "warning"}
        loader = "None" if loader_name == "stage" else "__import__('load_test').registry_loader"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER.format(loader=loader), str(folder), json.dumps(cfg)],
                                     env=env)

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was ready")
            try:
                if _get(self.port, "/health", 1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s")

    def metrics(self) -> dict[str, float]:
        """Server-side figures from /metrics: requests finished by (method, route), batches, rows."""
        status, body = _get(self.port, "/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
            if name == "edgekd_http_requests_total":
                key = f"finished {labels.get('method')} {labels.get('route')}"
                out[key] = out.get(key, 0.0) + value
            elif name in ("edgekd_inference_batch_size_count", "edgekd_inference_batch_size_sum",
                          "edgekd_http_inference_requests_in_flight"):
                out[name] = value
        return out

    def settle(self, timeout: float = 5) -> None:
        """Wait until no inference request is in progress (requests a client abandoned finish)."""
        end = time.monotonic() + timeout
        while self.metrics().get("edgekd_http_inference_requests_in_flight", 0.0) > 0 and time.monotonic() < end:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- clients -------------------------------------------------------------------------------------------
def _encode_requests(port: int, method: str, path: str) -> list[bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if method == "GET":
        return [(head + "\r\n").encode()]
    return [(head + f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b for b in BODIES]


def _content_length(head: bytes) -> int:
    i = head.lower().find(b"\r\ncontent-length:")
    if i < 0:
        raise ValueError("a response without Content-Length")
    j = head.find(b"\r\n", i + 17)
    return int(head[i + 17:j if j >= 0 else None])


async def lean_drive(port: int, clients: int, requests: int, seconds: float, method: str, path: str,
                     warmup: int = 3) -> dict[str, Any]:
    """``clients`` closed-loop clients, each on its own keep-alive connection, sending pre-encoded
    requests until either bound; each waits for its request in flight before it stops."""
    reqs = _encode_requests(port, method, path)
    latencies: list[float] = []
    counts = {"sent": 0, "answered": 0, "ok": 0, "4xx": 0, "5xx": 0, "other": 0, "errors": 0, "timeouts": 0}
    perf = time.perf_counter

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> tuple[int, bool]:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(_content_length(head))
        return int(head[9:12]), b"connection: close" in head.lower()

    async def worker() -> None:
        reader, writer = await connect()
        try:
            for i in range(warmup):  # open the connection and warm the route
                await exchange(reader, writer, reqs[i % len(reqs)])
            warmed.append(1)
            if len(warmed) == clients:
                all_warm.set()
            await ready.wait()
            while counts["sent"] < requests and time.monotonic() < end:
                counts["sent"] += 1
                req = reqs[counts["sent"] % len(reqs)]
                t = perf()
                try:
                    async with asyncio.timeout(CLIENT_TIMEOUT_S):
                        status, close = await exchange(reader, writer, req)
                except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                        TimeoutError) as e:
                    counts["timeouts" if isinstance(e, TimeoutError) else "errors"] += 1
                    writer.close()
                    reader, writer = await connect()
                    continue
                latencies.append(perf() - t)
                counts["answered"] += 1
                kind = "ok" if status == 200 else "5xx" if status >= 500 else "4xx" if status >= 400 else "other"
                counts[kind] += 1
                if close:
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    ready, all_warm = asyncio.Event(), asyncio.Event()
    warmed: list[int] = []
    end = time.monotonic() + seconds
    tasks = [asyncio.create_task(worker()) for _ in range(clients)]
    # Every client connects and warms up before the clock starts (a failure there is raised).
    waiter = asyncio.create_task(all_warm.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not all_warm.is_set():
        waiter.cancel()
        await asyncio.gather(*tasks)
        raise RuntimeError("a client stopped before it was ready")
    end = time.monotonic() + seconds
    start = perf()
    ready.set()
    await asyncio.gather(*tasks)
    wall = perf() - start
    lat_ms = np.asarray(latencies) * 1e3
    return {**counts, "abandoned": 0, "seconds": wall, "lat_ms": lat_ms, "lat_w": np.ones_like(lat_ms)}


def run_lean(port: int, clients: int, requests: int, seconds: float, method: str, path: str) -> dict[str, Any]:
    coro = lean_drive(port, clients, requests, seconds, method, path)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def run_wrk(port: int, clients: int, requests: int, seconds: float, method: str, path: str,
            bodies_file: Path | None) -> dict[str, Any]:
    """One wrk run: one thread (the machine's cores are the server's), ``clients`` connections."""
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, math.ceil(seconds))}s", f"--timeout={CLIENT_TIMEOUT_S:g}s",
           "--latency", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--", str(requests), method, path]
    if bodies_file is not None:
        cmd.append(str(bodies_file))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGEKD_WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no report (status {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    w = json.loads(line.split(" ", 1)[1])
    e, lat = w["errors"], w["latency_us"]
    errors = e["connect"] + e["read"] + e["write"]
    return {
        "sent": w["sent"], "answered": w["answered"], "ok": w["ok"], "4xx": w["4xx"], "5xx": w["5xx"],
        "other": w["other"], "errors": errors, "timeouts": e["timeout"],
        # In flight when wrk stopped at its bound (at most one per connection); checked against the server.
        "abandoned": max(0, w["sent"] - w["answered"] - errors - e["timeout"]),
        "seconds": w["duration_us"] / 1e6,
        # wrk's latency histogram as 1000 quantiles, each standing for a thousandth of the answers.
        "lat_ms": np.asarray(w["quantiles_us"], dtype=float) / 1e3,
        "lat_w": np.full(len(w["quantiles_us"]), w["answered"] / max(1, len(w["quantiles_us"]))),
        "wrk_p50_ms": lat["50"] / 1e3, "wrk_p99_ms": lat["99"] / 1e3,
    }


class Client:
    """Runs a phase with wrk or the lean client, counting lost requests against the server's metrics."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.bodies_file: Path | None = None
        if kind == "wrk":
            self.bodies_file = workdir / "bodies.jsonl"
            self.bodies_file.write_bytes(b"\n".join(BODIES) + b"\n")

    def _run(self, port: int, clients: int, requests: int, seconds: float, method: str, path: str) -> dict[str, Any]:
        if self.kind == "wrk":
            return run_wrk(port, clients, requests, seconds, method, path,
                           self.bodies_file if method == "POST" else None)
        return run_lean(port, clients, requests, seconds, method, path)

    def warm_up(self, server: ServerProcess, clients: int, requests: int, seconds: float = 1.0,
                route: tuple[str, str] = PREDICT) -> None:
        """Open the connections and warm the route (and the runner at the batch sizes to come)."""
        self._run(server.port, clients, requests, seconds, *route)
        server.settle()

    def phase(self, server: ServerProcess, clients: int, requests: int, seconds: float,
              route: tuple[str, str]) -> dict[str, Any]:
        method, path = route
        key = f"finished {method} {path}"
        before = server.metrics()
        row = self._run(server.port, clients, requests, seconds, method, path)
        # Requests the client abandoned at its bound still run to the end in the server: wait for them.
        deadline = time.monotonic() + 5
        while True:
            after = server.metrics()
            finished = after.get(key, 0.0) - before.get(key, 0.0)
            if finished >= row["sent"] - row["errors"] - row["timeouts"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        finished_unread = max(0.0, finished - row["answered"])
        row["server_finished"] = int(finished)
        row["lost"] = row["errors"] + row["timeouts"] + int(max(0.0, row["abandoned"] - finished_unread))
        calls = after.get("edgekd_inference_batch_size_count", 0.0) - before.get("edgekd_inference_batch_size_count", 0.0)
        rows = after.get("edgekd_inference_batch_size_sum", 0.0) - before.get("edgekd_inference_batch_size_sum", 0.0)
        row["runner_calls"] = int(calls)
        row["runner_rows"] = int(rows)
        return {"client": self.kind, "clients": clients, **row}


COUNTS = ("sent", "answered", "ok", "4xx", "5xx", "other", "errors", "timeouts", "abandoned", "lost",
          "server_finished", "runner_calls", "runner_rows")


def pool(mode: str, slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from a phase's slices (one per round): counts and time summed, latency
    percentiles of all answered requests together."""
    lat = np.concatenate([sl["lat_ms"] for sl in slices])
    w = np.concatenate([sl["lat_w"] for sl in slices])
    row: dict[str, Any] = {"mode": mode, "client": slices[0]["client"], "clients": slices[0]["clients"],
                           **{k: sum(sl[k] for sl in slices) for k in COUNTS}}
    row["seconds"] = sum(sl["seconds"] for sl in slices)
    row["req_per_s"] = row["ok"] / row["seconds"] if row["seconds"] else float("nan")
    row["mean_batch"] = row["runner_rows"] / row["runner_calls"] if row["runner_calls"] else float("nan")
    for q in (50, 90, 99):
        row[f"p{q}_ms"] = _wpct(lat, w, q)
    row["slices"] = [{"ok": sl["ok"], "seconds": sl["seconds"], "p50_ms": _wpct(sl["lat_ms"], sl["lat_w"], 50),
                      "req_per_s": sl["ok"] / sl["seconds"] if sl["seconds"] else float("nan")} for sl in slices]
    return row


def pick_client(name: str) -> str:
    if name == "auto":
        return "wrk" if shutil.which("wrk") else "lean"
    if name == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--client wrk: wrk is not on PATH (apt-get install wrk), use --client lean")
    return name


# --- report --------------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    raw = result["raw"]
    lines = [
        f"Machine: {result['environment']['cpu']}, {result['environment']['cpu_count']} cores; load average "
        f"(1 min) {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after. "
        f"Client: {result['client']}. Runtime threads: "
        f"{'the runtime default' if result['args']['threads'] == 'None' else result['args']['threads']}.",
        f"Raw runner ({raw['runner']}, batch 1, before each of {result['rounds']} rounds of HTTP phases and after "
        f"the last): run p50 {raw['runner_p50_ms']:.3f} ms "
        f"(per pass: {', '.join(f'{x:.3f}' for x in raw['runner_p50_ms_per_pass'])}); tokenise + run p50 "
        f"{raw['tokenize_run_p50_ms']:.3f} ms (per pass: {', '.join(f'{x:.3f}' for x in raw['tokenize_run_p50_ms_per_pass'])}), "
        f"p99 {raw['tokenize_run_p99_ms']:.3f} ms; batch 32: p50 {raw['batch32_ms']:.2f} ms per call; throughput "
        f"(texts over total time, pre-tokenised) {raw['batch1_texts_per_s']:.0f} texts/s at batch 1, "
        f"{raw['batch32_texts_per_s']:.0f} at batch 32.",
        "",
        "| server | clients | sent | ok | 5xx | lost | p50 ms | p99 ms | req/s | rows/runner call |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["http"]:
        batch = "" if row["runner_calls"] == 0 else f"{row['mean_batch']:.1f}"
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row['sent']} | {row['ok']} | {row['5xx']} | {row['lost']} "
            f"| {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['req_per_s']:.0f} | {batch} |"
        )
    r = result["ratios"]
    lines += [
        "",
        f"- HTTP overhead at p50 (unbatched server, 1 client, minus the raw runner's tokenise + run): "
        f"{r['http_overhead_p50_ms']:.3f} ms (target <= 1 ms: {'met' if r['http_overhead_p50_ms'] <= 1 else 'NOT met'}); "
        f"minus the pre-tokenised run alone: {r['http_overhead_vs_run_p50_ms']:.3f} ms; round by round: "
        f"{', '.join(f'{x:.3f}' for x in r['http_overhead_p50_ms_per_round'])} ms",
        f"- of which the client and HTTP floor (GET /v2/health/live p50): {r['floor_p50_ms']:.3f} ms",
        f"- batched / unbatched throughput at 32 clients: {r['batching_speedup_32']:.2f}x "
        f"(target >= 2x: {'met' if r['batching_speedup_32'] >= 2 else 'NOT met'}; round by round: "
        f"{', '.join(f'{x:.2f}' for x in r['batching_speedup_32_per_round'])}); the raw runner's own "
        f"batch-32 over batch-1 throughput: {r['runner_batch32_gain']:.2f}x",
        f"- {batching_advice(r['batching_speedup_32'])}",
        f"- 5xx: {r['total_5xx']}, lost: {r['total_lost']} (target 0 and 0); 4xx: {r['total_4xx']}; other non-200: "
        f"{r['total_other_status']}; requests "
        f"abandoned in flight at the client's bound (answered by the server, per its metrics): {r['total_abandoned']}",
    ]
    return "\n".join(lines)


def batching_advice(speedup: float) -> str:
    """What the measured gain says about ``serve.batching`` for this artifact on this machine."""
    if speedup >= PAYS:
        return (f"batching pays for this artifact here ({speedup:.2f}x at 32 clients): turn `serve.batching` on "
                "where concurrent load is expected; keep it off where one client's latency matters most.")
    return (f"batching does not pay for this artifact here ({speedup:.2f}x at 32 clients): the runner is "
            "already busy at batch 1, so keep `serve.batching` off.")


def run_one(folder: Path, args: argparse.Namespace, client_kind: str) -> dict[str, Any]:
    """Every phase against one export folder: raw runner, both servers, raw runner again."""
    from edgekd.runfolder import environment

    # Other work on the machine moves every figure: its load is recorded before and after.
    result: dict[str, Any] = {"export_dir": str(folder), "args": {k: str(v) for k, v in vars(args).items()},
                              "environment": environment(), "client": client_kind,
                              "load_average_before": os.getloadavg()}
    raw_runner = RawRunner(folder, args.threads, args.loader)
    rounds = max(1, args.rounds)
    per_requests, per_seconds = max(1, args.requests // rounds), args.duration / rounds
    plan = [("floor: GET /v2/health/live", "unbatched", FLOOR, 1),
            ("floor: GET /v2/health/live", "unbatched", FLOOR, 32),
            ("unbatched", "unbatched", PREDICT, 1), ("batched", "batched", PREDICT, 1),
            ("unbatched", "unbatched", PREDICT, 32), ("batched", "batched", PREDICT, 32)]
    raw_passes: list[dict[str, list[float]]] = []
    slices: list[list[dict[str, Any]]] = [[] for _ in plan]
    servers: dict[str, ServerProcess] = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-load-") as tmp:
        client = Client(client_kind, Path(tmp))
        try:
            for mode, batching in (("unbatched", False), ("batched", True)):
                settings = {"batching": batching, "max_queue": 100_000,
                            **({"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
                               if batching else {})}  # (the server refuses them without batching)
                if args.threads:
                    settings["threads"] = args.threads
                servers[mode] = ServerProcess(folder, settings, args.loader)
            warm_requests = min(args.requests, 500)
            for server in servers.values():
                server.wait_ready()
                client.warm_up(server, 32, warm_requests)
            # Rounds: every phase runs a slice of its budget in each, the raw runner between them,
            # so that load from other work drifting during the run moves every figure alike.
            for r in range(rounds):
                raw_passes.append(raw_runner.sample(per_seconds / 2, per_requests))
                for i, (_, server_name, route, clients) in enumerate(plan):
                    if r == 0:
                        client.warm_up(servers[server_name], clients, warm_requests, min(1.0, args.duration), route)
                    slices[i].append(client.phase(servers[server_name], clients, per_requests, per_seconds, route))
        finally:
            for server in servers.values():
                server.stop()
    raw_passes.append(raw_runner.sample(per_seconds / 2, per_requests))
    rows = [pool(mode, sl) for (mode, *_), sl in zip(plan, slices, strict=True)]
    result["http"] = rows
    result["rounds"] = rounds
    result["raw"] = summarize_raw(raw_passes, type(raw_runner.runner).__name__)
    result["load_average_after"] = os.getloadavg()

    def pick(mode: str, clients: int) -> dict[str, Any]:
        return next(r for r in rows if r["mode"] == mode and r["clients"] == clients)

    raw = result["raw"]
    # The same difference round by round (each server slice against the raw pass just before it).
    paired = [sl["p50_ms"] - raw["tokenize_run_p50_ms_per_pass"][r]
              for r, sl in enumerate(pick("unbatched", 1)["slices"])]
    result["ratios"] = {
        # Like with like: the server's /predict at 1 client does tokenise + pad + run for one text.
        "http_overhead_p50_ms": pick("unbatched", 1)["p50_ms"] - raw["tokenize_run_p50_ms"],
        "http_overhead_p50_ms_per_round": paired,
        "http_overhead_p50_ms_median_of_rounds": float(np.median(paired)),
        "http_overhead_vs_run_p50_ms": pick("unbatched", 1)["p50_ms"] - raw["runner_p50_ms"],
        "floor_p50_ms": pick("floor: GET /v2/health/live", 1)["p50_ms"],
        "batching_speedup_32": pick("batched", 32)["req_per_s"] / pick("unbatched", 32)["req_per_s"],
        "batching_speedup_32_per_round": [b["req_per_s"] / u["req_per_s"] for u, b in
                                          zip(pick("unbatched", 32)["slices"], pick("batched", 32)["slices"],
                                              strict=True)],
        # The runner's own batch-32 over batch-1 throughput, no HTTP: what batching has to work with.
        "runner_batch32_gain": raw["batch32_texts_per_s"] / raw["batch1_texts_per_s"],
        "total_5xx": sum(r["5xx"] for r in rows),
        "total_4xx": sum(r["4xx"] for r in rows),
        "total_other_status": sum(r["other"] for r in rows),  # neither 200 nor 4xx/5xx
        "total_lost": sum(r["lost"] for r in rows),
        "total_abandoned": sum(r["abandoned"] for r in rows),
    }
    return result


def summary(results: list[dict[str, Any]]) -> str:
    lines = ["| artifact | overhead p50 ms | batched/unbatched at 32 | runner batch-32 gain | batching | 5xx | lost |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for res in results:
        r = res["ratios"]
        lines.append(f"| {res['export_dir']} | {r['http_overhead_p50_ms']:.3f} | {r['batching_speedup_32']:.2f}x "
                     f"| {r['runner_batch32_gain']:.2f}x | {'on' if r['batching_speedup_32'] >= PAYS else 'off'} "
                     f"| {r['total_5xx']} | {r['total_lost']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, nargs="+",
                   help="export folder(s) (runs/<name>/export/<target>), measured one after the other")
    p.add_argument("--requests", type=int, default=20_000, help="most requests per phase")
    p.add_argument("--duration", type=float, default=10.0,
                   help="most seconds per phase (wrk counts whole seconds: at least 1 per round)")
    p.add_argument("--rounds", type=int, default=4,
                   help="each phase runs in this many slices, interleaved with the others and the raw runner")
    p.add_argument("--client", choices=["auto", "wrk", "lean"], default="auto",
                   help="auto: wrk when it is on PATH, else the lean asyncio client")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (runner and server alike)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--loader", choices=["stage", "registry"], default="stage",
                   help="stage: edgekd.export.stage.load_artifact (as `edgekd serve`); registry: Exporter.load")
    p.add_argument("--out", type=Path, default=None,
                   help="write the results as JSON here (one folder: its result; several: {'runs': [...]})")
    args = p.parse_args(argv)

    from edgekd.runfolder import atomic_write_text

    client_kind = pick_client(args.client)
    results = []
    for folder in args.export_dir:
        results.append(run_one(folder, args, client_kind))
        print(f"## {folder}\n\n{table(results[-1])}\n", flush=True)
    if len(results) > 1:
        print(summary(results))
    out = results[0] if len(results) == 1 else {"runs": results}
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
