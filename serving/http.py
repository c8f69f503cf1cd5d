"""HTTP plumbing shared by the routers: errors as JSON, the body limit, metrics, auth, content type.

Every error body is ``{"error": "<what was wrong and what to do>"}`` (the Open Inference
Protocol's error shape), so clients of every route parse failures the same way.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgekd.serving.errors import RequestError, ServingError
from edgekd.serving.metrics import Metrics

log = logging.getLogger("edgekd.serving")

BODY_METHODS = {"POST", "PUT", "PATCH"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _count(request: Request, kind: str) -> None:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(kind).inc()


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[int, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "")
        return 400, f"the request body is not valid JSON ({reason}): send a JSON object."
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        _count(request, exc.kind)
        return error_response(exc.status, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, "bad_request")
        status, message = _describe_validation(list(exc.errors()))
        # The offending input is not echoed back: it may be most of a large body.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error_response(status, message, detail=json.loads(json.dumps(detail, default=str)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /docs for the routes this server has."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see /docs."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # A bug or a runtime failure, not the client's fault: log it in full, say little.
        log.exception("internal error on %s %s", request.method, request.url.path)
        _count(request, "internal")
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details.")


# --- dependencies ------------------------------------------------------------------------------------
async def require_api_key(request: Request) -> None:
    """Accept ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` when the server has a key."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    supplied = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if supplied is None and auth[:7].lower() == "bearer ":
        supplied = auth[7:].strip()
    if not supplied:
        raise RequestError("this server needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
                           401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        raise RequestError("the API key is not valid.", 401, "unauthorized", {"WWW-Authenticate": "Bearer"})


async def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = media or "none"
        raise RequestError(f"the body must be JSON: send `Content-Type: application/json` (got {shown}).", 415)


# --- ASGI middleware ---------------------------------------------------------------------------------
class ServingMiddleware:
    """Counts and times every request by route template, and refuses bodies over the limit (413)
    before the app reads them. Plain ASGI, not BaseHTTPMiddleware, to keep per-request cost low."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        counted = scope["method"] in BODY_METHODS
        if counted:
            self.metrics.request_started()
        try:
            if counted:
                body = await self._read_body(scope, receive)
                if body is None:
                    self.metrics.errors.labels("too_large").inc()
                    response = error_response(
                        413, f"the request body is over the {self.max_body_bytes}-byte limit: send fewer or shorter texts.",
                        {"Connection": "close"},
                    )
                    await response(scope, receive, send_wrapper)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.metrics.request_finished()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as Starlette expects

    return replay
