"""HTTP plumbing shared by the routers: errors as JSON, the body limit, metrics, auth, content type,
reading a JSON body by hand (for routes that also take other media types), and inflating a body sent
with ``Content-Encoding`` gzip or deflate (bounded by the body limit).

Every error body is ``{"error": "<what was wrong and what to do>"}`` (the Open Inference
Protocol's error shape), so clients of every route parse failures the same way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgekd.serving.errors import RequestError, ServingError
from edgekd.serving.metrics import Metrics

log = logging.getLogger("edgekd.serving")

BODY_METHODS = {"POST", "PUT", "PATCH"}
MULTIPART = "multipart/form-data"

M = TypeVar("M", bound=BaseModel)


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
# Declared so that the OpenAPI document has the security schemes; the key itself is checked below
# (either header may carry it), and the document marks it optional when the server has no key.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="`Authorization: Bearer KEY`.")
_X_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="`X-API-Key: KEY`.")


async def require_api_key(request: Request, _bearer: Any = Security(_BEARER), _key: Any = Security(_X_API_KEY)) -> None:
    """Accept ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` when the server has a key."""
    error = api_key_error(request.app.state.settings.api_key, request.headers.get("x-api-key"),
                          request.headers.get("authorization", ""))
    if error is not None:
        raise error


def api_key_error(key: SecretStr | None, x_api_key: str | None, authorization: str) -> RequestError | None:
    """The refusal of a request carrying these headers, or None when it may pass (or no key is set)."""
    if key is None:
        return None
    supplied = x_api_key
    if supplied is None and authorization[:7].lower() == "bearer ":
        supplied = authorization[7:].strip()
    if not supplied:
        return RequestError("this server needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
                            401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        return RequestError("the API key is not valid.", 401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    return None


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when there is no Content-Type)."""
    return parse_media_type(request.headers.get("content-type", ""))


def parse_media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def require_json(request: Request) -> None:
    media = media_type(request)
    if not is_json(media):
        shown = media or "none"
        raise RequestError(f"the body must be JSON: send `Content-Type: application/json` (got {shown}).", 415)


async def read_json(request: Request) -> Any:
    """The body parsed as JSON (400 when it is not), for routes that parse their body themselves."""
    return parse_json(await request.body())


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """``raw`` parsed as JSON; 400 when it is not JSON or nests deeper than the parser's recursion limit
    (a body like ``[[[[...]]]]`` must be a client error, not a RecursionError)."""
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise RequestError(f"{what} is not valid JSON ({e}): send a JSON object.", 400) from None
    except RecursionError:
        raise RequestError(f"{what} nests arrays or objects too deeply: send flat lists of values.", 400) from None


def validate_body(model: type[M], data: Any, loc: str = "body") -> M:
    """``model`` from parsed data; errors reported exactly as FastAPI reports a declared body's."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": (loc, *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


# --- compressed request bodies ---------------------------------------------------------------------------
# Content-Encoding -> zlib's wbits: gzip, and deflate as the zlib format that HTTP's "deflate" is (RFC 9110)
# and tritonclient sends (zlib.compress).
DECODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _wbits(encoding: str, data: bytes) -> int:
    """zlib's wbits for ``data``; a "deflate" body without the zlib header is raw deflate, which some
    clients send under that name."""
    if encoding == "deflate" and not (len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0):
        return -zlib.MAX_WBITS
    return DECODINGS[encoding]


def _decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """``raw`` decoded from ``encoding``, never more than ``limit`` bytes of it: a small body that inflates
    past the server's body limit is a 413 before the rest is inflated, not memory spent on it."""
    out: list[bytes] = []
    size, rest = 0, raw
    try:
        while True:  # gzip bodies may hold several members, one after the other
            d = zlib.decompressobj(_wbits(encoding, rest))
            chunk = d.decompress(rest, limit + 1 - size)
            size += len(chunk)
            out.append(chunk)
            if size > limit:
                raise RequestError(f"the request body inflates ({encoding}) to over the {limit}-byte limit "
                                   "(max_body_bytes): send fewer or shorter inputs.", 413, "too_large")
            if not d.eof:
                raise RequestError(f"the request body is not complete {encoding} data (it ends early).")
            rest = d.unused_data
            if not rest or encoding == "deflate":  # only gzip chains members
                break
    except zlib.error as e:
        raise RequestError(f"the request body is not valid {encoding} data ({e}): compress it with {encoding}, "
                           "or leave Content-Encoding out.") from None
    if rest:
        raise RequestError(f"the request body has {len(rest)} bytes after its {encoding} data.")
    return b"".join(out)


def decoded_body(request: Request, raw: bytes, limit: int) -> bytes:
    """The body with its Content-Encoding (gzip, deflate; tritonclient's request_compression_algorithm)
    undone, last applied first, at most ``limit`` bytes of it (413 past it); 415 for an encoding this
    server does not read. The v2 infer route and POST /predict both read compressed bodies through it."""
    header = request.headers.get("content-encoding", "")
    encodings = [e.strip().lower() for e in header.split(",") if e.strip() and e.strip().lower() != "identity"]
    if unknown := [e for e in encodings if e not in DECODINGS]:
        raise RequestError(f"Content-Encoding {', '.join(unknown)} is not one this server reads: send the body "
                           "uncompressed, or compressed with gzip or deflate.", 415)
    for encoding in reversed(encodings):
        raw = _decompress(raw, encoding, limit)
    return raw


async def decoded_request(request: Request, limit: int) -> Request:
    """``request`` itself when it has no Content-Encoding; otherwise the same request with its body
    inflated (``decoded_body``) and its headers saying so, for handlers that read the body themselves
    (JSON, multipart forms)."""
    if "content-encoding" not in request.headers:
        return request
    raw = decoded_body(request, await request.body(), limit)
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-encoding", b"content-length")]
    scope = {**request.scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
    return Request(scope, _replay(raw, request.receive))


# Fields other serving APIs read, and what to send here instead.
FOREIGN = {"inputs": "Hugging Face Inference Endpoints", "instances": "KServe v1 / TensorFlow Serving"}


def foreign_field(data: dict[str, Any], one: str, many: str) -> str | None:
    """A helpful refusal of a body written for another serving API ({"inputs": ...}, {"instances": ...})."""
    for key, api in FOREIGN.items():
        if key in data and one not in data and many not in data:
            return (f"'{key}' is the request field of {api}; this server reads '{one}' (one) or '{many}' (a list): "
                    f"send {{\"{many}\": [...]}}, or use the Open Inference Protocol at /v2/models/<name>/infer.")
    return None


# --- ASGI middleware ---------------------------------------------------------------------------------
# A handler of one hot route that answers without FastAPI's routing, dependencies and response
# validation: given the scope and the body read, the JSON body of a 200 answer, or None to hand the
# request on to the app (for every case it does not cover, so that errors stay those of the route).
# A ServingError it raises is answered as the app's handler answers it.
FastHandler = Callable[[Scope, bytes], Awaitable[bytes | None]]

_JSON_200_HEADERS = [(b"content-type", b"application/json")]


class ServingMiddleware:
    """Counts and times every request by route template, and refuses bodies over the limit (413)
    before the app reads them. Plain ASGI, not BaseHTTPMiddleware, to keep per-request cost low;
    ``fast`` maps (method, path) to a ``FastHandler`` tried before the app."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int,
                 fast: dict[tuple[str, str], FastHandler] | None = None, body_timeout_s: float = 30):
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.fast = dict(fast or {})
        self._routes: list[tuple[re.Pattern[str], str, set[str] | None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        template = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        counted = method in BODY_METHODS
        if counted:
            self.metrics.request_started()
        try:
            if counted:
                try:
                    body = await self._read_body(scope, receive)
                except RequestError as exc:
                    self.metrics.errors.labels(exc.kind).inc()
                    template = self._template(scope)
                    await error_response(exc.status, str(exc), exc.headers)(scope, receive, send_wrapper)
                    return
                if body is None:
                    self.metrics.errors.labels("too_large").inc()
                    template = self._template(scope)
                    response = error_response(
                        413, f"the request body is over the {self.max_body_bytes}-byte limit (max_body_bytes): send "
                        "fewer or shorter texts, or fewer or smaller images.",
                        {"Connection": "close"},
                    )
                    await response(scope, receive, send_wrapper)
                    return
                handler = self.fast.get((method, scope["path"]))
                if handler is not None:
                    template = scope["path"]  # also when it raises: a 500 is counted under its route
                    try:
                        answer = await handler(scope, body)
                    except ServingError as exc:  # as the app's ServingError handler answers it
                        self.metrics.errors.labels(exc.kind).inc()
                        await error_response(exc.status, str(exc), exc.headers)(scope, receive, send_wrapper)
                        return
                    if answer is None:
                        template = None
                    else:
                        status = 200
                        await send({"type": "http.response.start", "status": 200, "headers": [
                            (b"content-length", str(len(answer)).encode()), *_JSON_200_HEADERS]})
                        await send({"type": "http.response.body", "body": answer})
                        return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.metrics.request_finished()
            if template is None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(template, method, status, time.perf_counter() - start)

    def _template(self, scope: Scope) -> str:
        """The template of the app's route for this request's path, as the router picks it (a route of
        another method too: the app answers it 405), for a request refused before the app ran (its
        body too large or too slow). An unknown path is "unmatched", as the app counts it, so that the
        route label of /metrics takes no more values than the app has routes."""
        if self._routes is None:
            self._routes = _route_table(scope.get("app"))
        path, method = scope["path"], scope["method"]
        partial = None
        for regex, template, methods in self._routes:
            if regex.match(path):
                if not methods or method in methods:
                    return template
                partial = partial or template
        return partial or "unmatched"

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body_now(scope, receive)
        except TimeoutError:
            raise RequestError(f"the request body did not all arrive within {self.body_timeout_s:g} s "
                               "(body_timeout_s): send it at once.", 408, "timeout", {"Connection": "close"}) from None

    async def _read_body_now(self, scope: Scope, receive: Receive) -> bytes | None:
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


def _route_table(app: Any) -> list[tuple[re.Pattern[str], str, set[str] | None]]:
    """(path regex, template, methods) of each of the app's routes, in the router's order. Recent FastAPI
    keeps included routers as branches of ``app.routes`` (``iter_route_contexts`` walks them); older
    releases list the routes themselves there."""
    import fastapi.routing

    routes = list(getattr(app, "routes", ()))
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    found = [(c.path, c.methods) for c in walk(routes)] if walk else \
        [(getattr(r, "path", None), getattr(r, "methods", None)) for r in routes]
    return [(compile_path(path)[0], path, set(methods) if methods else None) for path, methods in found
            if isinstance(path, str)]


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as Starlette expects

    return replay


# --- connection timeouts ---------------------------------------------------------------------------------
def guarded_protocol(base: type, header_timeout_s: float) -> type:
    """``base`` (a uvicorn HTTP protocol class) that closes a connection whose request headers are not
    complete ``header_timeout_s`` after it opened, or after the first byte of a later request. uvicorn
    times out idle keep-alive connections, but not one that never sends (or trickles) its headers."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._between_requests():
                if self._header_timer is None:
                    self._arm()
            elif self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            # Both uvicorn protocols start a new cycle once a request's headers are complete.
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._header_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            self._header_timer = None
            if self.cycle is self._header_cycle and self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
