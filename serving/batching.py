"""Runs the runner off the event loop, one request per call or micro-batched across requests.

The runner is blocking native code, so calls go to a small thread pool: the event loop keeps
accepting and parsing requests while the model works. With batching on, the inputs (texts or
images: whatever the codec encodes) of concurrent requests run as one batch of at most
``max_batch_size`` rows, stacked by the codec's ``pad``, and every output is split back per request.
While every worker is busy, inputs pile up in the queue, so batches grow exactly when load does.
When a worker is free, the batcher waits (at most ``max_wait_ms``, counted from the oldest waiting
input) only while other requests have arrived and are still being read, decoded or tokenised: a
lone request runs at once, so batching costs no latency at low load.

The one exception to the thread pool, batching on or off: a request that is the only one in
progress, with no runner call under way, and whose call is measured to be short (the recent time
per input row times its rows, at most ``INLINE_MAX_S``) runs on the event loop itself. The loop has
nothing else to do meanwhile, and the hand-off to a thread and back costs about as much as a small
model's call (a tenth of a millisecond or more, more still on a loaded machine).

Rows must not change each other's answers. A dynamic-int8 artifact (``precision: int8-dynamic``)
computes its activation scales per call over the whole input tensor, padding included, so a row's
answer would depend on the rows (and padding) that share its call. For such an artifact batching
is refused with an error that recommends the static int8 artifact, and every runner call holds
one row: a request of several texts gets the answers each text gets alone.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekd.devices.remote_runner import ROW_DEPENDENT_PRECISIONS, own_length_row
from edgekd.errors import StageError
from edgekd.export.base import Runner
from edgekd.serving.codec import Codec
from edgekd.serving.errors import OverloadedError, ShuttingDownError

# Longest runner call (estimated) that may run on the event loop, when no other request is in
# progress. Any request arriving meanwhile waits at most this long to be read: about the batcher's
# default wait window. Slower models (or long inputs) always run in the thread pool.
INLINE_MAX_S = 0.002

BatchObserver = Callable[[int, float], None]


def check_batching(precision: str | None, batching: bool) -> int | None:
    """Rows per runner call an artifact of ``precision`` allows: None (any), or 1 when its rows
    depend on each other. Batching such an artifact is an error that says what to serve instead."""
    why = ROW_DEPENDENT_PRECISIONS.get(str(precision))
    if why is None:
        return None
    if batching:
        raise StageError(
            f"serve.batching is on, but this artifact is {precision} ({why}): a request's answer would "
            "depend on which other requests shared its batch. Serve a static int8 artifact instead "
            "(export/onnx-int8-static, whose scales are fixed: the quantize stage writes it when a static setup "
            "ships, quantize.method: static or a static candidate chosen), or set "
            "serve.batching: false (EDGEKD_SERVE_BATCHING=false)."
        )
    return 1
Outputs = dict[str, np.ndarray]  # runner outputs by name, one row per input


@dataclass
class _Job:
    items: Sequence[Any]
    future: asyncio.Future[Outputs]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Groups submitted jobs into runner calls of at most ``max_batch_size`` inputs."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Outputs],
        executor: ThreadPoolExecutor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        slots: int,
        arrivals: Callable[[], int] | None = None,
    ):
        """``arrivals()`` counts requests in progress server-wide (submitted or not); without it the
        batcher always waits the full ``max_wait_s`` for a batch to fill."""
        self._run_batch = run_batch
        self._arrivals = arrivals
        self._running_jobs = 0
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._slots_n = slots
        self._queue: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._slots_n)
        self._task = asyncio.create_task(self._dispatch(), name="edgekd-batcher")

    def submit(self, items: Sequence[Any]) -> asyncio.Future[Outputs]:
        """Queue ``items``; the future resolves to their output rows (every output), in order."""
        if self._closing or self._task is None:
            raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another replica.")
        job = _Job(items, self._loop.create_future())
        self._queue.append(job)
        self._wakeup.set()
        return job.future

    async def drain(self) -> None:
        """Stop taking jobs, finish every queued and running one, then return."""
        self._closing = True
        if self._task is None:
            return
        self._wakeup.set()
        await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._task = None

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closing:
                    self._slots.release()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            jobs = await self._collect()
            if not jobs:
                self._slots.release()
                continue
            self._start(jobs)

    async def _collect(self) -> list[_Job]:
        jobs: list[_Job] = []
        n = 0
        # The wait is counted from the oldest job, which may already have waited for a free worker.
        deadline = self._queue[0].enqueued + self.max_wait_s
        while True:
            while self._queue and (n == 0 or n + len(self._queue[0].items) <= self.max_batch_size):
                job = self._queue.popleft()
                if job.future.done():  # its request timed out or its client went away
                    continue
                jobs.append(job)
                n += len(job.items)
            full = n >= self.max_batch_size or bool(self._queue)
            remaining = deadline - time.monotonic()
            if full or remaining <= 0 or self._closing or not self._more_coming(len(jobs)):
                return jobs
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _more_coming(self, collected: int) -> bool:
        """True while some request in progress has not reached the batcher yet."""
        if self._arrivals is None:
            return True
        return self._arrivals() > collected + self._running_jobs + len(self._queue)

    def _start(self, jobs: list[_Job]) -> None:
        """Hand the batch to the pool now (not from a task that would first wait its turn on the loop)."""
        self._running_jobs += len(jobs)
        try:
            items = [it for job in jobs for it in job.items]
            call = self._loop.run_in_executor(self._executor, self._run_batch, items)
        except Exception as e:  # the pool is shut down
            self._running_jobs -= len(jobs)
            self._slots.release()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        task = asyncio.create_task(self._finish(jobs, call))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _finish(self, jobs: list[_Job], call: asyncio.Future[Outputs]) -> None:
        out: Outputs | None = None
        error: BaseException | None = None
        try:
            out = await call
        except BaseException as e:  # the runner failed (or this task was cancelled): the batch gets it
            error = e
        # Free the worker before answering: the dispatcher (woken first) hands the next batch to the
        # pool before this batch's requests write their responses, so the runner does not sit idle
        # while the event loop answers them.
        self._running_jobs -= len(jobs)
        self._slots.release()
        start = 0
        for job in jobs:
            stop = start + len(job.items)
            if not job.future.done():
                if out is not None:
                    job.future.set_result({name: value[start:stop] for name, value in out.items()})
                elif isinstance(error, Exception):
                    job.future.set_exception(error)
                else:
                    job.future.cancel()
            start = stop
        if error is not None and not isinstance(error, Exception):
            raise error


class InferenceEngine:
    """The served runner and codec, with the thread pool and (optionally) the micro-batcher."""

    def __init__(
        self,
        runner: Runner,
        codec: Codec,
        *,
        workers: int = 1,
        batching: bool = False,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        on_batch: BatchObserver | None = None,
        arrivals: Callable[[], int] | None = None,
        precision: str | None = None,
    ):
        """``precision``: the artifact's (artifact.json); a row-dependent one refuses ``batching``
        and runs one row per call (see ``check_batching``)."""
        rows_per_call = check_batching(precision, batching)
        self.one_row_per_call = rows_per_call == 1
        self.runner = runner
        self.codec = codec
        # The outputs the codec reads: only these are kept, sliced per request and checked for rows.
        self.outputs = tuple(codec.select_outputs(list(runner.output_names)))
        self.output_name = self.outputs[0]
        self.workers = workers
        self.batching = batching
        # Artifacts that plan memory ahead (ExecuTorch, Core ML, TensorRT profiles) take at most
        # ``runner.max_batch`` rows per call; larger requests are run in slices of that size.
        self.runner_max_batch: int | None = getattr(runner, "max_batch", None)
        if rows_per_call is not None:
            self.runner_max_batch = min(self.runner_max_batch or rows_per_call, rows_per_call)
        if self.runner_max_batch:
            max_batch_size = min(max_batch_size, self.runner_max_batch)
        self.max_batch_size = max_batch_size
        # Rows per runner call: the artifact's limit and, when batching, max_batch_size, which a single
        # request with more inputs than it must not exceed either (the batcher takes a first job whole).
        self.call_rows: int | None = max_batch_size if batching else self.runner_max_batch
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._arrivals = arrivals
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher | None = None
        self._pending = 0
        self._running = 0  # runner calls in progress (pool threads or inline), under _running_lock
        self._running_lock = threading.Lock()
        # Recent runner time per input row (exponential moving average), None until measured: what
        # decides whether a lone request's call is short enough to run on the event loop.
        self.seconds_per_row: float | None = None

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="edgekd-runner")
        if self.batching:
            self._batcher = MicroBatcher(
                self.run_items, self._executor, max_batch_size=self.max_batch_size,
                max_wait_s=self.max_wait_ms / 1000.0, slots=self.workers, arrivals=self._arrivals,
            )
            self._batcher.start()

    async def stop(self) -> None:
        """Finish queued and running work, then release the threads (graceful shutdown)."""
        if self._batcher is not None:
            await self._batcher.drain()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    # --- blocking calls, run in the pool -----------------------------------------------------------
    def run_items(self, items: list[Any]) -> Outputs:
        if self.one_row_per_call and len(items) > 1:
            # Each item padded on its own too: padding of a row-dependent artifact changes answers.
            parts = [self.run_arrays_blocking(self.codec.pad([item])) for item in items]
            return {name: np.concatenate([p[name] for p in parts]) for name in self.outputs}
        out = self.run_arrays_blocking(self.codec.pad(items))
        return {name: out[name] for name in self.outputs}

    def run_arrays_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        if self.one_row_per_call:
            # Tensors a client padded (v2 token inputs, alone or together): each row alone at the width its
            # attention mask marks, as a text is served, so its answer does not depend on its neighbours.
            parts = [self._call(own_length_row(inputs, i)) for i in range(rows)]
        else:
            step = self.call_rows or rows
            parts = [self._call({k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, rows, step)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _call(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        with self._running_lock:
            self._running += 1
        start = time.perf_counter()
        try:
            out = self.runner.run(inputs)
        finally:
            with self._running_lock:
                self._running -= 1
        seconds = time.perf_counter() - start
        per_row = seconds / max(rows, 1)
        last = self.seconds_per_row
        self.seconds_per_row = per_row if last is None else 0.8 * last + 0.2 * per_row
        for name in self.outputs:
            got = len(out[name])
            if got != rows:
                raise StageError(f"the runner returned {got} rows of '{name}' for {rows} inputs: "
                                 "the artifact does not keep the batch axis; re-export it.")
        if self._on_batch is not None:
            self._on_batch(rows, seconds)
        return out

    # --- async API for the routes ------------------------------------------------------------------
    async def infer(self, items: Sequence[Any]) -> Outputs:
        """The codec's outputs for encoded ``items`` (row i for item i), batched with other requests
        when batching is on."""
        self._admit(len(items))
        if self._inline(len(items)):
            # Requests already read in this turn of the event loop have not started yet: let them
            # reach this point (one turn), then run inline only if this one is still alone.
            await asyncio.sleep(0)
            if self._inline(len(items)):
                self._admit(len(items))
                return self.run_items(list(items))
        self._pending += len(items)
        try:
            if self._batcher is not None:
                return await self._batcher.submit(items)
            return await asyncio.get_running_loop().run_in_executor(self._require_executor(), self.run_items, list(items))
        finally:
            self._pending -= len(items)

    def _inline(self, rows: int) -> bool:
        """Run on the event loop: this is the only request in progress (server-wide, as counted by
        ``arrivals``), no runner call or batch is under way or queued, and the call is measured to
        be short."""
        per_row = self.seconds_per_row
        return (
            per_row is not None and per_row * rows <= INLINE_MAX_S
            and self._arrivals is not None and self._arrivals() <= 1
            and self._pending == 0 and self._running == 0
        )

    async def logits(self, items: Sequence[Any]) -> np.ndarray:
        """A classifier's logits of ``items``, one row each."""
        return (await self.infer(items))[self.output_name]

    async def run_arrays(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw tensors straight to the runner (one call, no batching across requests)."""
        n = len(next(iter(inputs.values())))
        self._admit(n)
        self._pending += n
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._require_executor(), self.run_arrays_blocking, inputs
            )
        finally:
            self._pending -= n

    def _admit(self, n: int) -> None:
        if self._executor is None:
            raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another replica.")
        if self._pending + n > self.max_queue:
            raise OverloadedError(
                f"the server is overloaded ({self._pending} inputs waiting, limit {self.max_queue}); retry shortly."
            )

    def _require_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another replica.")
        return self._executor
