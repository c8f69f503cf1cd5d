"""Prometheus metrics, kept in a registry per app (never the process-wide default registry)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts by route and status, latency, runner batch sizes, errors by kind, and inputs
    (texts, images) served."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgekd_http_requests", "Requests by route, method and status: HTTP's by route template, method and "
            "status code; gRPC's by RPC path (/inference.GRPCInferenceService/ModelInfer...), method GRPC and "
            "status code name (OK, INVALID_ARGUMENT...).",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "edgekd_http_request_duration_seconds", "Time from request start to response end, by route (HTTP and gRPC).",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "edgekd_inference_batch_size", "Inputs (texts or images: rows) per runner call.",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "edgekd_inference_duration_seconds", "Time of one runner call.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.errors = Counter(
            "edgekd_errors", "Requests that failed, by kind (bad_request, unauthorized, too_large, "
            "timeout, overloaded, internal).", ["kind"], registry=self.registry,
        )
        self._in_flight = 0
        self._family_counters: dict[str, Counter] = {}
        self._request_children: dict[tuple[str, str, int | str], tuple[Any, Any]] = {}
        Gauge("edgekd_http_inference_requests_in_flight", "Inference requests being read, run or answered: HTTP "
              "POSTs and gRPC ModelInfer calls.",
              registry=self.registry).set_function(self.in_flight)
        self.texts = Counter("edgekd_texts", "Texts classified (a row of v2 INT64 token tensors is one text).",
                             registry=self.registry)
        self.images = Counter("edgekd_images", "Images run through a detection model.", registry=self.registry)
        self.detections = Counter("edgekd_detections", "Detections returned (after NMS and thresholds).",
                                  registry=self.registry)
        self.truncated = Counter(
            "edgekd_texts_truncated", "Texts cut to max_length tokens.", registry=self.registry
        )

    def counter(self, name: str, documentation: str) -> Counter:
        """A counter of a task family's own (e.g. ``edgekd_rows``: what its routes served), registered in
        this app's registry on first use and the same object after; the built-in ones above are kept."""
        if not name.startswith("edgekd_"):
            raise ValueError(f"metric name {name!r}: start it with 'edgekd_', as every metric of the server.")
        found = self._family_counters.get(name)
        if found is None:
            found = self._family_counters[name] = Counter(name, documentation, registry=self.registry)
        return found

    def observe_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """Count one finished request and its duration (label lookups cached: once per route/status);
        ``status`` is an HTTP status code, or a gRPC status code's name."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(route, method, str(status)),
                                                      self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def request_started(self) -> None:
        self._in_flight += 1

    def request_finished(self) -> None:
        self._in_flight -= 1

    def in_flight(self) -> int:
        """Inference requests in progress: HTTP POSTs from the first byte read to the last byte sent, gRPC
        ModelInfer calls from the decoded request to the answer (the batcher's ``arrivals``)."""
        return self._in_flight

    def observe_batch(self, size: int, seconds: float) -> None:
        """Called from runner threads (prometheus_client metrics are thread-safe)."""
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
