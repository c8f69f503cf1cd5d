"""Load test of the inference server against its own runner, on loopback only.

    python benchmarks/load_test.py runs/default/export/onnx --requests 2000 --duration 20 --out load.json

Measures, in one run and side by side:
  1. the raw runner in this process (batch 1 and batch 32, pre-tokenised; and tokenise + run),
  2. the server (uvicorn in a child process on a free 127.0.0.1 port) at 1 and 32 concurrent
     clients (httpx AsyncClient), with batching off and on,
and prints a Markdown table with p50/p99 latency, throughput, 5xx and lost requests, plus the
ratios the serving issue sets targets for: HTTP overhead at p50 over the raw runner (<= 1 ms) and
batched over unbatched throughput at 32 clients (>= 2x). Every phase is bounded by --requests and
--duration, and the child server is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
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

SERVER = """
import sys
from edgekd.serving import ServeSettings, serve
serve(sys.argv[1], None, ServeSettings.model_validate_json(sys.argv[2]), loader={loader})
"""


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


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


class RawRunner:
    """The artifact's runner in this process, fed the same texts as the server, without HTTP."""

    def __init__(self, folder: Path, threads: int | None, loader_name: str):
        from edgekd.serving.codec import TextCodec, label_names

        self.runner, meta = _load(folder, threads, loader_name)
        self.codec = TextCodec.from_folder(
            folder, max_length=int(meta.get("max_length") or 128), overflow="truncate",
            input_names=list(self.runner.input_names), labels=label_names(meta),
        )
        self.singles = [self.codec.pad(self.codec.encode([t])) for t in TEXTS]
        self.batch32 = self.codec.pad(self.codec.encode([TEXTS[i % len(TEXTS)] for i in range(32)]))
        for x in self.singles:  # warm-up
            self.runner.run(x)

    def sample(self, seconds: float, n: int) -> dict[str, list[float]]:
        """Batch-1 latency pre-tokenised (runner) and with tokenising (tokenize_run); batch-32 calls."""
        def timed(fn, limit: int) -> list[float]:
            out, end = [], time.monotonic() + seconds
            for i in range(limit):
                t = time.perf_counter()
                fn(i)
                out.append(time.perf_counter() - t)
                if time.monotonic() > end:
                    break
            return out

        run, codec = self.runner.run, self.codec
        return {
            "runner": timed(lambda i: run(self.singles[i % len(self.singles)]), n),
            "tokenize_run": timed(lambda i: run(codec.pad(codec.encode([TEXTS[i % len(TEXTS)]]))), n),
            "batch32": timed(lambda i: run(self.batch32), max(5, n // 32)),
        }


def summarize_raw(passes: list[dict[str, list[float]]], runner: str) -> dict[str, Any]:
    """Pooled over the passes taken before and after the HTTP phases, so load drifting on a shared
    machine shows up in the spread (``runner_p50_ms_per_pass``) instead of biasing one side."""
    pooled = {k: [x for p in passes for x in p[k]] for k in passes[0]}
    return {
        "runner_p50_ms": _pct(pooled["runner"], 50) * 1e3, "runner_p99_ms": _pct(pooled["runner"], 99) * 1e3,
        "runner_p50_ms_per_pass": [_pct(p["runner"], 50) * 1e3 for p in passes],
        "tokenize_run_p50_ms": _pct(pooled["tokenize_run"], 50) * 1e3,
        "batch32_texts_per_s": 32 / float(np.median(pooled["batch32"])),
        "runner": runner, "calls": len(pooled["runner"]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def drive(url: str, clients: int, requests: int, seconds: float, path: str = "/predict") -> dict[str, Any]:
    """``clients`` closed-loop clients, each its own ``httpx.AsyncClient`` with one connection (one
    shared client serialises on its connection pool and halves the load it can offer), sending
    single-text POST /predict requests (or GET ``path`` for the floor) until either bound."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sent = lost = 0
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(base_url=url, timeout=30, limits=limits) for _ in range(clients)]

    async def call(client: httpx.AsyncClient, i: int) -> httpx.Response:
        if path == "/predict":
            return await client.post(path, json={"text": TEXTS[i % len(TEXTS)]})
        return await client.get(path)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent, lost
        for i in range(3):  # open the connection and warm the route
            await call(client, i)
        await ready.wait()
        while sent < requests and time.monotonic() < end:
            sent += 1
            t = time.perf_counter()
            try:
                r = await call(client, sent)
            except httpx.HTTPError:
                lost += 1
                continue
            latencies.append(time.perf_counter() - t)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    ready = asyncio.Event()
    try:
        tasks = [asyncio.create_task(worker(c)) for c in pool]
        await asyncio.sleep(0.5 + 0.02 * clients)  # let every client warm up before the clock starts
        end = time.monotonic() + seconds
        start = time.perf_counter()
        ready.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    finally:
        for c in pool:
            await c.aclose()
    ok = statuses.get("200", 0)
    return {
        "clients": clients, "sent": sent, "ok": ok, "lost": lost,
        "5xx": sum(v for k, v in statuses.items() if k.startswith("5")), "statuses": statuses,
        "p50_ms": _pct(latencies, 50) * 1e3, "p99_ms": _pct(latencies, 99) * 1e3,
        "req_per_s": ok / wall if wall else float("nan"), "seconds": wall,
    }


def table(result: dict[str, Any]) -> str:
    raw = result["raw"]
    lines = [
        f"Machine: {result['environment']['cpu']}, {result['environment']['cpu_count']} cores; load average "
        f"(1 min) {result['load_average_before'][0]:.1f} before, {result['load_average_after'][0]:.1f} after.",
        f"Raw runner ({raw['runner']}, batch 1, pre-tokenised, before and after the HTTP phases): "
        f"p50 {raw['runner_p50_ms']:.3f} ms (per pass: "
        f"{', '.join(f'{x:.3f}' for x in raw['runner_p50_ms_per_pass'])}), "
        f"p99 {raw['runner_p99_ms']:.3f} ms; tokenise + run p50 {raw['tokenize_run_p50_ms']:.3f} ms; "
        f"batch 32: {raw['batch32_texts_per_s']:.0f} texts/s.",
        "",
        "| server | clients | sent | ok | 5xx | lost | p50 ms | p99 ms | req/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["http"]:
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row['sent']} | {row['ok']} | {row['5xx']} | {row['lost']} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['req_per_s']:.0f} |"
        )
    r = result["ratios"]
    lines += [
        "",
        f"- HTTP overhead at p50 (unbatched, 1 client, minus raw runner): {r['http_overhead_p50_ms']:.2f} ms "
        f"(target <= 1 ms: {'met' if r['http_overhead_p50_ms'] <= 1 else 'NOT met'}); "
        f"minus tokenise + run: {r['http_only_overhead_p50_ms']:.2f} ms",
        f"- of which the client and HTTP floor (GET /v2/health/live p50): {r['floor_p50_ms']:.2f} ms; "
        f"the server's own /predict work beyond the floor and the runner: {r['server_overhead_p50_ms']:.2f} ms",
        f"- batched / unbatched throughput at 32 clients: {r['batching_speedup_32']:.2f}x "
        f"(target >= 2x: {'met' if r['batching_speedup_32'] >= 2 else 'NOT met'}); the ceiling, the raw runner's "
        f"batch-32 over batch-1 throughput: {r['runner_batch32_gain']:.2f}x",
        f"- 5xx: {r['total_5xx']}, lost: {r['total_lost']} (target 0 and 0); 4xx: {r['total_4xx']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, help="an export folder (runs/<name>/export/<target>)")
    p.add_argument("--requests", type=int, default=2000, help="most requests per phase")
    p.add_argument("--duration", type=float, default=20.0, help="most seconds per phase")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (runner and server alike)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--loader", choices=["stage", "registry"], default="stage",
                   help="stage: edgekd.export.stage.load_artifact (as `edgekd serve`); registry: Exporter.load")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from edgekd.runfolder import atomic_write_text, environment

    folder = args.export_dir
    # Other work on the machine moves every figure: its load is recorded before and after.
    result: dict[str, Any] = {"export_dir": str(folder), "args": {k: str(v) for k, v in vars(args).items()},
                              "environment": environment(), "load_average_before": os.getloadavg()}
    raw_runner = RawRunner(folder, args.threads, args.loader)
    raw_passes = [raw_runner.sample(args.duration / 2, args.requests)]
    rows = []
    for mode, batching in (("unbatched", False), ("batched", True)):
        settings = {"batching": batching, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                    "max_queue": 100_000}
        if args.threads:
            settings["threads"] = args.threads
        server = ServerProcess(folder, settings, args.loader)
        try:
            server.wait_ready()
            if not batching:  # the floor: what this client and HTTP stack cost with no model at all
                for clients in (1, 32):
                    row = asyncio.run(drive(server.url, clients, args.requests, args.duration, "/v2/health/live"))
                    rows.append({"mode": "floor: GET /v2/health/live", **row})
            for clients in (1, 32):
                row = asyncio.run(drive(server.url, clients, args.requests, args.duration))
                rows.append({"mode": mode, **row})
        finally:
            server.stop()
    result["http"] = rows
    raw_passes.append(raw_runner.sample(args.duration / 2, args.requests))
    result["raw"] = summarize_raw(raw_passes, type(raw_runner.runner).__name__)
    result["load_average_after"] = os.getloadavg()

    def pick(mode: str, clients: int) -> dict[str, Any]:
        return next(r for r in rows if r["mode"] == mode and r["clients"] == clients)

    raw = result["raw"]
    result["ratios"] = {
        "http_overhead_p50_ms": pick("unbatched", 1)["p50_ms"] - raw["runner_p50_ms"],
        "http_only_overhead_p50_ms": pick("unbatched", 1)["p50_ms"] - raw["tokenize_run_p50_ms"],
        "floor_p50_ms": pick("floor: GET /v2/health/live", 1)["p50_ms"],
        "server_overhead_p50_ms": pick("unbatched", 1)["p50_ms"] - pick("floor: GET /v2/health/live", 1)["p50_ms"]
        - raw["runner_p50_ms"],
        "batching_speedup_32": pick("batched", 32)["req_per_s"] / pick("unbatched", 32)["req_per_s"],
        # The most batching can give: the runner's own batch-32 over batch-1 throughput, no HTTP.
        "runner_batch32_gain": raw["batch32_texts_per_s"] * raw["runner_p50_ms"] / 1e3,
        "total_5xx": sum(r["5xx"] for r in rows),
        "total_4xx": sum(v for r in rows for k, v in r["statuses"].items() if k.startswith("4")),
        "total_lost": sum(r["lost"] for r in rows),
    }
    print(table(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
