"""The Open Inference Protocol v2 over HTTP (KServe v2 / Triton): health, metadata, config, inference.

What standard clients send is accepted as they send it: JSON with or without a ``Content-Type``
(``tritonclient.http`` sends none), and Triton's binary tensor data extension: a request whose
``Inference-Header-Content-Length`` header says how many leading bytes are the JSON header, the
inputs' raw bytes following (each input's ``parameters.binary_data_size``), and binary outputs in
the answer when asked (``parameters.binary_data_output`` for all, or an output's ``binary_data``),
which is tritonclient's default; an output's ``binary_data`` overrides ``binary_data_output`` either way.
A body compressed with gzip or deflate (``Content-Encoding``, tritonclient's ``request_compression_algorithm``)
is inflated, at most to the body limit; an answer is compressed when the client accepts it
(``Accept-Encoding``, its ``response_compression_algorithm``). Triton's classification extension (an
output's ``classification`` parameter) answers the top K classes as "<score>:<index>:<label>" strings.
A tensor with Triton's shared-memory parameters is a 400, over gRPC too: those extensions are not implemented.
Every route also exists under ``/versions/{version}`` (version 1, the only one). The tensors themselves
are decoded and run in ``v2_core``, shared with gRPC.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

import edgekd
from edgekd.serving import v2_core
from edgekd.serving.api_predict import ERRORS
from edgekd.serving.context import Serving, get_serving
from edgekd.serving.errors import RequestError
from edgekd.serving.http import decoded_body, is_json, media_type, parse_json, require_api_key, validate_body
from edgekd.serving.schemas import (
    ErrorBody,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ReadyResponse,
    ServerMetadataResponse,
)

HEADER_LENGTH = "inference-header-content-length"
NOT_FOUND = {404: {"model": ErrorBody, "description": "Unknown model or version."}}
UNAUTHORIZED = {401: ERRORS[401]}

health = APIRouter(prefix="/v2", tags=["v2 health"])
router = APIRouter(prefix="/v2", tags=["v2 inference"], dependencies=[Depends(require_api_key)],
                   responses={**UNAUTHORIZED, 503: ERRORS[503]})


async def named_model(name: str, serving: Serving = Depends(get_serving)) -> Serving:
    """The serving context when ``name`` is the served model's name; 404 otherwise."""
    v2_core.check_model(serving, name)
    return serving


async def versioned_model(name: str, version: str, serving: Serving = Depends(get_serving)) -> Serving:
    v2_core.check_model(serving, name, version)
    return serving


def _ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


@health.get("/health/live", response_model=LiveResponse, summary="Server live (always 200 while it answers)")
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@health.get("/health/ready", response_model=ReadyResponse,
            responses={400: {"model": ReadyResponse, "description": "Not ready (loading or shutting down)."}},
            summary="Server ready (200 when the model is loaded, else 400)")
async def ready(request: Request) -> JSONResponse:
    ok = _ready(request)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 400)


@router.get("", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata() -> ServerMetadataResponse:
    return ServerMetadataResponse(name="edgekd", version=edgekd.__version__, extensions=v2_core.EXTENSIONS)


# --- per-model routes, each also under /versions/{version} ---------------------------------------------------
def _model_ready(request: Request) -> JSONResponse:
    ok = _ready(request)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 400)


def _metadata(serving: Serving) -> ModelMetadataResponse:
    model = serving.model
    spec = v2_core.model_spec(model)
    return ModelMetadataResponse(
        name=model.name, versions=[v2_core.MODEL_VERSION], platform=model.platform,
        inputs=[MetadataTensor(name=n, datatype=d, shape=s) for n, d, s in spec.inputs],
        outputs=[MetadataTensor(name=n, datatype=d, shape=s) for n, d, s in spec.outputs],
        parameters=spec.parameters,
    )


_READY = {"response_model": ReadyResponse, "responses": {**NOT_FOUND, 400: {"model": ReadyResponse}},
          "summary": "Model ready (200 when loaded, else 400)"}
_META = {"response_model": ModelMetadataResponse, "response_model_exclude_none": True, "responses": NOT_FOUND,
         "summary": "Model metadata"}
_CONFIG = {"responses": {**NOT_FOUND, 200: {"content": {"application/json": {"schema": {"type": "object"}}},
                                            "description": "Triton's model configuration (JSON)."}},
           "summary": "Model configuration (Triton's shape)"}


@router.get("/models/{name}/ready", **_READY)
async def model_ready(request: Request, serving: Serving = Depends(named_model)) -> JSONResponse:
    return _model_ready(request)


@router.get("/models/{name}/versions/{version}/ready", **_READY)
async def model_version_ready(request: Request, serving: Serving = Depends(versioned_model)) -> JSONResponse:
    return _model_ready(request)


@router.get("/models/{name}", **_META)
async def model_metadata(serving: Serving = Depends(named_model)) -> ModelMetadataResponse:
    return _metadata(serving)


@router.get("/models/{name}/versions/{version}", **_META)
async def model_version_metadata(serving: Serving = Depends(versioned_model)) -> ModelMetadataResponse:
    return _metadata(serving)


@router.get("/models/{name}/config", **_CONFIG)
async def model_config(serving: Serving = Depends(named_model)) -> dict[str, Any]:
    return v2_core.model_config(serving.model, serving.settings)


@router.get("/models/{name}/versions/{version}/config", **_CONFIG)
async def model_version_config(serving: Serving = Depends(versioned_model)) -> dict[str, Any]:
    return v2_core.model_config(serving.model, serving.settings)


# --- inference ---------------------------------------------------------------------------------------------
# Answers shorter than this go uncompressed even to a client that accepts gzip (as Starlette's GZipMiddleware):
# compressing a few hundred bytes saves nothing.
COMPRESS_MIN_BYTES = 500
COMPRESS_INLINE_BYTES = 64_000  # compressed in a worker thread above this


def _encoding_accepted(request: Request) -> str | None:
    """gzip or deflate when the client accepts it (tritonclient's response_compression_algorithm sends
    ``Accept-Encoding``), gzip first; None otherwise."""
    accepted = {}
    for part in request.headers.get("accept-encoding", "").split(","):
        name, _, params = part.partition(";")
        q = params.strip().removeprefix("q=") if params.strip().startswith("q=") else "1"
        try:
            accepted[name.strip().lower()] = float(q)
        except ValueError:
            continue
    return next((e for e in ("gzip", "deflate") if accepted.get(e, 0) > 0), None)


async def _compress(content: bytes, encoding: str) -> bytes:
    """``content`` compressed (fastest level: the answer is on its way); in a worker thread when it is big
    enough to hold up other requests."""
    pack = (lambda b: gzip.compress(b, compresslevel=1)) if encoding == "gzip" else (lambda b: zlib.compress(b, 1))
    return pack(content) if len(content) <= COMPRESS_INLINE_BYTES else await asyncio.to_thread(pack, content)


def _split_body(request: Request, raw: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    header = request.headers.get(HEADER_LENGTH)
    if header is None:
        media = media_type(request)
        if media and not is_json(media):
            raise RequestError(f"the body must be JSON (send `Content-Type: application/json` or none), or JSON "
                               f"plus binary tensors with an `Inference-Header-Content-Length` header (got {media}).",
                               415)
        return raw, b""
    try:
        n = int(header)
    except ValueError:
        n = -1
    if not 0 <= n <= len(raw):
        raise RequestError(f"Inference-Header-Content-Length is {header!r} but the body has {len(raw)} bytes: it must "
                           "be the length of the JSON part at the start of the body.")
    return raw[:n], raw[n:]


def _parameter(params: dict[str, Any] | None, key: str) -> Any:
    return (params or {}).get(key)


def _decode(body: InferenceRequest, binary: bytes) -> list[v2_core.Tensor]:
    tensors, offset = [], 0
    for inp in body.inputs:
        size = _parameter(inp.parameters, "binary_data_size")
        if size is None:
            if inp.data is None:
                raise RequestError(f"input '{inp.name}' has no data: send 'data', or binary data with "
                                   "parameters.binary_data_size.")
            tensors.append(v2_core.from_values(inp.name, inp.datatype, inp.shape, v2_core.flatten(inp.data)))
            continue
        if type(size) is not int or size < 0:
            raise RequestError(f"input '{inp.name}': binary_data_size must be a whole number of bytes (got {size!r}).")
        if inp.data is not None:
            raise RequestError(f"input '{inp.name}' has both 'data' and binary_data_size: send one of them.")
        if offset + size > len(binary):
            raise RequestError(f"input '{inp.name}' says {size} bytes of binary data but the body has only "
                               f"{len(binary) - offset} left after the JSON header and the inputs before it.")
        tensors.append(v2_core.from_raw(inp.name, inp.datatype, inp.shape, binary[offset:offset + size]))
        offset += size
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary) - offset} bytes of binary data that no input's "
                           "binary_data_size accounts for.")
    return tensors


async def _infer(request: Request, serving: Serving) -> Response:
    raw = decoded_body(request, await request.body(), serving.settings.max_body_bytes)
    json_part, binary = _split_body(request, raw)
    body = validate_body(InferenceRequest, parse_json(json_part, "the inference request's JSON"))
    v2_core.refuse_shared_memory([(i.name, i.parameters) for i in body.inputs],
                                 [(o.name, o.parameters) for o in body.outputs or []])
    classes = {o.name: k for o in body.outputs or [] if (k := v2_core.class_count(o.name, o.parameters)) is not None}
    requested = [o.name for o in body.outputs] if body.outputs else None
    outputs = await v2_core.infer(_decode(body, binary), requested, serving, classes)
    # binary_data_output says it for every output, and an output's own binary_data overrides it (both ways).
    all_binary = _parameter(body.parameters, "binary_data_output") is True
    own = {o.name: _parameter(o.parameters, "binary_data") for o in body.outputs or []}
    listed, chunks = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        binary_here = own.get(out.name)
        if binary_here is True or (binary_here is not False and all_binary):
            raw_out = out.raw()
            entry["parameters"] = {"binary_data_size": len(raw_out)}
            chunks.append(raw_out)
        else:
            entry["data"] = out.as_list()
        listed.append(entry)
    answer = {"model_name": serving.model.name, "model_version": v2_core.MODEL_VERSION, "outputs": listed}
    if body.id is not None:
        answer["id"] = body.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    content, headers = header + b"".join(chunks), {}
    if chunks:  # the JSON header's length before compression, as Triton sends it
        headers["Inference-Header-Content-Length"] = str(len(header))
    if len(content) >= COMPRESS_MIN_BYTES and (encoding := _encoding_accepted(request)):
        content = await _compress(content, encoding)
        headers["Content-Encoding"] = encoding
        headers["Vary"] = "Accept-Encoding"
    return Response(content, media_type="application/octet-stream" if chunks else "application/json",
                    headers=headers)


_INFER_DOC = {
    "response_model": InferenceResponse,
    "responses": {
        **ERRORS, **NOT_FOUND,
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "JSON, or with binary outputs asked for: the JSON header (its length in the "
                             "Inference-Header-Content-Length header) followed by the outputs' bytes."},
    },
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
    }}},
    "summary": "Inference (Open Inference Protocol v2; binary tensor data extension supported)",
}


@router.post("/models/{name}/infer", **_INFER_DOC)
async def infer(request: Request, serving: Serving = Depends(named_model)) -> Response:
    return await _infer(request, serving)


@router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)
async def infer_version(request: Request, serving: Serving = Depends(versioned_model)) -> Response:
    return await _infer(request, serving)
