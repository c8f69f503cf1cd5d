"""The application factory and the ``serve`` entry point.

``create_app(settings)`` builds a FastAPI app whose ``lifespan`` verifies and loads the artifact
into ``app.state`` (model, engine, metrics) and, on shutdown, drains the batcher so that every
accepted request gets its answer. Nothing lives at module level: two apps in one process share
no model, no queue and no metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

import edgekd
from edgekd.errors import EdgeKDError
from edgekd.export.base import read_artifact_meta
from edgekd.serving import api_ops, api_predict, api_v2
from edgekd.serving.batching import InferenceEngine, check_batching
from edgekd.serving.context import Serving
from edgekd.serving.http import ServingMiddleware, guarded_protocol, install_error_handlers
from edgekd.serving.metrics import Metrics
from edgekd.serving.model import Loader, ServedModel, load_served_model, resolve_export_dir, verify_artifact
from edgekd.serving.settings import ServeSettings

log = logging.getLogger("edgekd.serving")

DESCRIPTION = """Classify texts, or detect objects in images, with an edgekd export (ONNX Runtime,
TensorRT, ExecuTorch, PyTorch): whichever task the served artifact was exported for.

* `POST /predict` — text models: `{"text": "..."}` or `{"texts": [...]}`. Detection models: image
  files as multipart/form-data (`file`, or several `files`) or JSON `{"image": "<base64>"}` /
  `{"images": [...]}`; options `conf_threshold`, `iou_threshold`, `max_det`.
* `POST /v2/models/{name}/infer` — the Open Inference Protocol (KServe v2 / Triton), JSON or with
  Triton's binary tensor data extension; also over gRPC when the server has a `grpc_port`.
* `GET /health`, `GET /metadata`, `GET /metrics` (Prometheus).

Errors are JSON objects `{"error": "..."}` saying what to fix.
"""


def create_app(settings: ServeSettings | None = None, loader: Loader | None = None,
               model: ServedModel | None = None) -> FastAPI:
    """A FastAPI app serving ``settings.export_dir``.

    ``loader(folder, **runtime_opts) -> (runner, artifact_meta)`` defaults to
    ``edgekd.export.stage.load_artifact``; pass another to serve a runner built elsewhere. ``model``: one
    loaded already (``serve`` loads it before the server starts, so that a refusal is one clear error).
    """
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics: Metrics = app.state.metrics
        try:
            served = model if model is not None else load_served_model(settings, loader)
            engine = InferenceEngine(
                served.runner, served.codec, workers=settings.inference_workers, batching=settings.batching,
                max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue, on_batch=metrics.observe_batch, arrivals=metrics.in_flight,
                precision=served.meta.get("precision"),
            )
        except Exception as e:
            app.state.startup_error = e  # serve() re-raises it after uvicorn gives up
            raise
        await engine.start()
        app.state.serving = Serving(settings=settings, model=served, engine=engine, metrics=metrics)
        grpc_server = None
        if settings.grpc_port is not None:
            from edgekd.serving.grpc_v2 import start_server

            try:
                grpc_server = await start_server(lambda: app.state.serving if app.state.ready else None, settings)
            except Exception as e:
                await engine.stop()
                app.state.startup_error = e
                raise
        app.state.ready = True
        log.info("serving %s (%s) from %s, batching %s", served.name, served.target, served.folder,
                 "on" if settings.batching else "off")
        try:
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:  # in-flight RPCs finish, as HTTP's do
                await grpc_server.stop(settings.graceful_timeout_s)
            await engine.stop()
            log.info("stopped serving %s: in-flight work finished", served.name)

    app = FastAPI(title="edgekd inference server", version=edgekd.__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.serving = None
    app.state.ready = False
    app.state.startup_error = None
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, metrics=app.state.metrics, max_body_bytes=settings.max_body_bytes,
                       fast={("POST", "/predict"): api_predict.fast_predict}, body_timeout_s=settings.body_timeout_s)
    app.include_router(api_predict.router)
    app.include_router(api_v2.health)
    app.include_router(api_v2.router)
    app.include_router(api_ops.router)
    _document(app, settings)
    return app


def _document(app: FastAPI, settings: ServeSettings) -> None:
    """Make the OpenAPI document say what this server does: the schemas of the bodies the routes parse
    themselves, /predict's request shape for the served task (once the model is loaded), and the API
    key as optional when the server has none."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()  # build() caches the document it returns in app.openapi_schema
        doc.setdefault("components", {}).setdefault("schemas", {}).update(api_predict.openapi_components())
        serving: Serving | None = app.state.serving
        if serving is None:  # not loaded yet: every family's shapes, and not cached
            app.openapi_schema = None
        else:
            doc["paths"]["/predict"]["post"].update(serving.model.family.openapi())
        if settings.api_key is None:
            for ops in doc["paths"].values():
                for op in ops.values():
                    if "security" in op:
                        op["security"] = [{}, *op["security"]]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def uvicorn_config(app: FastAPI, settings: ServeSettings, **overrides: Any) -> Any:
    """uvicorn's configuration for ``app``: keep-alive and header timeouts from ``settings``."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "timeout_graceful_shutdown": max(1, round(settings.graceful_timeout_s)), "lifespan": "on",
        "access_log": settings.access_log, "server_header": False,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "http": guarded_protocol(AutoHTTPProtocol, settings.header_timeout_s),
        **overrides,
    }
    return uvicorn.Config(app, **options)


def serve(run_dir: str | Path, target: str | None = None, settings: ServeSettings | None = None,
          loader: Loader | None = None) -> None:
    """Serve ``RUN_DIR/export/<target>/`` (or an export folder given directly) until SIGINT/SIGTERM.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (up to
    ``graceful_timeout_s``), then the lifespan drains the batcher. Raises the load error (e.g. a
    sha256 mismatch) instead of serving a wrong or unverified artifact.
    """
    import uvicorn

    folder = resolve_export_dir(run_dir, target)
    # Checked here as well as at load, so that a refusal is one clear error, not a server log.
    verify_artifact(folder, read_artifact_meta(folder))
    settings = (settings or ServeSettings()).model_copy(update={"export_dir": folder})
    # Loaded before the server starts, for the same reason: a setting the export never reads, a runtime that
    # cannot open it, batching a row-dependent artifact are each raised here, without uvicorn's startup log.
    model = load_served_model(settings, loader)
    check_batching(model.meta.get("precision"), settings.batching)
    app = create_app(settings, loader, model=model)
    try:
        uvicorn.Server(uvicorn_config(app, settings)).run()
    except SystemExit:  # uvicorn exits with status 3 when the lifespan startup fails
        if app.state.startup_error is None:
            raise
    error = app.state.startup_error
    if error is not None:
        raise error if isinstance(error, EdgeKDError) else EdgeKDError(f"the server could not start: {error}")
