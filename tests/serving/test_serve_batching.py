"""Over real HTTP (uvicorn on loopback): micro-batching, limits under load, graceful shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import LABELS, RUN_NAME, slow_loader

TEXTS = [
    "good", "the movie was very dull", "a warm and lovely story", "bad acting and a messy plot",
    "fine", "it was not boring but quite flat", "brilliant", "the film is too long and tedious and bland",
] * 3


async def _post_all(url: str, bodies: list[dict], path: str = "/predict") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def _probs(resp: httpx.Response) -> np.ndarray:
    return np.array([[p["probabilities"][k] for k in LABELS] for p in resp.json()["predictions"]])


def test_live_server_predicts_and_answers_v2(live_server, reference):
    srv = live_server()
    r = httpx.post(f"{srv.url}/predict", json={"text": TEXTS[2]})
    assert r.status_code == 200, r.text
    want = np.exp(reference(TEXTS[2]))
    np.testing.assert_allclose(_probs(r)[0], want / want.sum(), atol=1e-6)
    r = httpx.post(f"{srv.url}/v2/models/{RUN_NAME}/infer",
                   json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXTS[2]]}]})
    assert r.status_code == 200 and r.json()["model_name"] == RUN_NAME
    r = httpx.post(f"{srv.url}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # A streamed body (chunked, no content-length) is read and limited the same way.
    chunks = [b'{"text": "', b"good " * 400, b'"}']
    r = httpx.post(f"{srv.url}/predict", content=iter(chunks), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_streamed_body_over_the_limit_is_413(live_server):
    srv = live_server(max_body_bytes=1000)
    chunks = [b'{"text": "', *([b"good " * 100] * 5), b'"}']
    r = httpx.post(f"{srv.url}/predict", content=iter(chunks), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000-byte limit" in r.json()["error"]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_batched_results_equal_unbatched(live_server):
    # A slow runner makes concurrent requests queue up, so batches really form across requests.
    box: list = []
    plain = live_server()
    batched = live_server(loader=slow_loader(0.05, box), batching=True, max_batch_size=8, max_wait_ms=20)
    bodies = [{"text": t} for t in TEXTS] + [{"texts": TEXTS[:3]}, {"texts": TEXTS[3:7]}]
    want = asyncio.run(_post_all(plain.url, bodies))
    got = asyncio.run(_post_all(batched.url, bodies))
    assert all(r.status_code == 200 for r in want + got)
    for w, g in zip(want, got, strict=True):
        assert [p["label"] for p in w.json()["predictions"]] == [p["label"] for p in g.json()["predictions"]]
        np.testing.assert_allclose(_probs(g), _probs(w), atol=1e-5)
        assert [p["truncated"] for p in w.json()["predictions"]] == [p["truncated"] for p in g.json()["predictions"]]
    calls = box[0].calls[1:]  # the first call is the warm-up
    assert sum(calls) == len(TEXTS) + 7
    assert max(calls) > 1, f"no batch formed: {calls}"
    assert max(calls) <= 8
    metrics = httpx.get(f"{batched.url}/metrics").text
    assert f"edgekd_inference_batch_size_count {float(len(calls))}" in metrics


def test_lone_request_does_not_wait_for_a_batch(live_server):
    srv = live_server(batching=True, max_wait_ms=1000)
    with httpx.Client(base_url=srv.url) as client:
        client.post("/predict", json={"text": "fine"})
        start = time.perf_counter()
        for _ in range(5):
            assert client.post("/predict", json={"text": "fine"}).status_code == 200
        per_request = (time.perf_counter() - start) / 5
    assert per_request < 0.5, f"a lone request waited {per_request:.3f} s for others"
    assert "edgekd_http_inference_requests_in_flight 0.0" in httpx.get(f"{srv.url}/metrics").text


def test_request_over_the_time_limit_gets_504(live_server):
    srv = live_server(loader=slow_loader(0.5), request_timeout_s=0.1)
    r = httpx.post(f"{srv.url}/predict", json={"text": "fine"}, timeout=10)
    assert r.status_code == 504
    assert "did not answer within 0.1 s" in r.json()["error"]
    assert 'edgekd_errors_total{kind="timeout"} 1.0' in httpx.get(f"{srv.url}/metrics").text


def test_overload_gets_503_not_a_crash(live_server):
    srv = live_server(loader=slow_loader(0.2), max_queue=2, batching=True, max_batch_size=2)
    got = asyncio.run(_post_all(srv.url, [{"text": "fine"}] * 6))
    codes = sorted(r.status_code for r in got)
    assert set(codes) == {200, 503}, codes
    busy = next(r for r in got if r.status_code == 503)
    assert "overloaded" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    assert httpx.post(f"{srv.url}/predict", json={"text": "fine"}, timeout=10).status_code == 200


@pytest.mark.parametrize("batching", [True, False])
def test_graceful_shutdown_finishes_in_flight_requests(live_server, batching):
    box: list = []
    grouping = {"max_batch_size": 4, "max_wait_ms": 5} if batching else {}  # (read only when batching)
    srv = live_server(loader=slow_loader(0.2, box), batching=batching, **grouping)
    results: list[httpx.Response] = []

    def fire():
        results.extend(asyncio.run(_post_all(srv.url, [{"text": t} for t in TEXTS[:8]])))

    client = threading.Thread(target=fire)
    client.start()
    # All eight requests received (a connection not yet accepted when the server stops is refused,
    # which is not what this test is about) and the first runner call under way.
    srv.wait_in_flight(8)
    deadline = time.monotonic() + 10
    while len(box[0].calls) < 2 and time.monotonic() < deadline:  # warm-up + at least one request call
        time.sleep(0.01)
    srv.stop()  # what uvicorn does on SIGTERM: stop accepting, finish in-flight, run lifespan shutdown
    client.join(timeout=30)
    assert not srv.thread.is_alive()
    assert [r.status_code for r in results] == [200] * 8
    assert sum(box[0].calls[1:]) == 8


SIGTERM_SERVER = """
import sys, time
import onnxruntime as ort
from edgekd.export.base import read_artifact_meta
from edgekd.serving import ServeSettings, serve

class Slow:
    def __init__(self, path):
        self.s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.s.get_inputs()]
        self.output_names = [o.name for o in self.s.get_outputs()]
    def run(self, inputs):
        time.sleep(0.3)
        return dict(zip(self.output_names, self.s.run(None, inputs)))

def loader(folder, **opts):
    meta = read_artifact_meta(folder)
    return Slow(folder / meta["file"]), meta

serve(sys.argv[1], None, ServeSettings(port=int(sys.argv[2]), batching=sys.argv[3] == "on", log_level="warning"),
      loader=loader)
"""


def test_sigterm_finishes_in_flight_requests_then_exits(export_dir):
    import signal
    import subprocess
    import sys

    from serve_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SERVER, str(export_dir), str(port), "on"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        results: list[httpx.Response] = []
        client = threading.Thread(target=lambda: results.extend(
            asyncio.run(_post_all(url, [{"text": t} for t in TEXTS[:6]]))))
        client.start()
        # All six requests received before the signal (the runner sleeps 0.3 s per call): one still
        # connecting when the server stops listening is refused, which this test is not about.
        deadline = time.monotonic() + 30
        while "edgekd_http_inference_requests_in_flight 6.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the six requests did not all reach the server"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        client.join(timeout=30)
        # uvicorn drains, runs the lifespan shutdown, then re-raises the signal it caught, so the
        # process ends as killed by SIGTERM (what process managers expect), not by a crash.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert [r.status_code for r in results] == [200] * 6
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_next_batch_is_handed_to_the_pool_before_the_last_one_is_answered():
    """With one worker, the batch waiting in the queue goes to the pool as soon as the running one
    returns, before that batch's requests resume to write their answers (no idle runner meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    from edgekd.serving.batching import MicroBatcher

    events: list[str] = []
    release_first = threading.Event()

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            events.append(f"submit {len(args[0])}")
            return super().submit(fn, *args, **kwargs)

    def run_batch(items):
        if items[0] == "a0":
            release_first.wait(10)
        return {"y": np.arange(len(items))}

    async def main():
        pool = RecordingPool(1)
        batcher = MicroBatcher(run_batch, pool, max_batch_size=8, max_wait_s=0.0, slots=1)
        batcher.start()

        async def request(item):
            out = await batcher.submit([item])
            events.append(f"answered {item}")
            return out

        first = asyncio.create_task(request("a0"))
        await asyncio.sleep(0.05)  # batch [a0] is running; the next three queue behind it
        rest = [asyncio.create_task(request(f"b{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        release_first.set()
        await asyncio.gather(first, *rest)
        await batcher.drain()
        pool.shutdown()

    asyncio.run(main())
    assert events[:3] == ["submit 1", "submit 3", "answered a0"], events
    assert sorted(events[3:]) == ["answered b0", "answered b1", "answered b2"], events


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_still_runs():
    from concurrent.futures import ThreadPoolExecutor

    from edgekd.serving.batching import MicroBatcher

    gate = threading.Event()

    def run_batch(items):
        if items[0] == "bad":
            gate.wait(10)
            raise ValueError("the runtime refused the batch")
        return {"y": np.array([len(it) for it in items])}

    async def main():
        pool = ThreadPoolExecutor(1)
        batcher = MicroBatcher(run_batch, pool, max_batch_size=8, max_wait_s=0.0, slots=1)
        batcher.start()
        bad = batcher.submit(["bad"])
        await asyncio.sleep(0.05)  # ["bad"] is running; the next two queue behind it as one batch
        first, second = batcher.submit(["b"]), batcher.submit(["b", "b" * 3])
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(bad, first, second, return_exceptions=True)
        await batcher.drain()
        pool.shutdown()
        return results

    bad, first, second = asyncio.run(main())
    assert isinstance(bad, ValueError) and "refused" in str(bad)
    assert first["y"].tolist() == [1] and second["y"].tolist() == [1, 3]
