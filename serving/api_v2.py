"""The Open Inference Protocol v2 over HTTP (KServe v2 / Triton): health, metadata, config, inference.

What standard clients send is accepted as they send it: JSON with or without a ``Content-Type``
(``tritonclient.http`` sends none), and Triton's binary tensor data extension: a request whose
``Inference-Header-Content-Length`` header says how many leading bytes are the JSON header, the
inputs' raw bytes following (each input's ``parameters.binary_data_size``), and binary outputs in
the answer when asked (``parameters.binary_data_output`` for all, or an output's ``binary_data``),
which is tritonclient's default. Every route also exists under ``/versions/{version}`` (version 1,
the only one). The tensors themselves are decoded and run in ``v2_core``, shared with gRPC.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

import edgekd
from edgekd.serving import v2_core
from edgekd.serving.api_predict import ERRORS
from edgekd.serving.context import Serving, get_serving
from edgekd.serving.errors import RequestError
from edgekd.serving.http import is_json, media_type, parse_json, require_api_key, validate_body
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
    return ServerMetadataResponse(name="edgekd", version=edgekd.__version__, extensions=["binary_tensor_data"])


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
    json_part, binary = _split_body(request, await request.body())
    body = validate_body(InferenceRequest, parse_json(json_part, "the inference request's JSON"))
    for out in body.outputs or []:
        if _parameter(out.parameters, "class_count"):
            raise RequestError(f"output '{out.name}': class_count (Triton's classification extension) is not "
                               "supported: ask for 'probabilities' and take the top classes.")
    requested = [o.name for o in body.outputs] if body.outputs else None
    outputs = await v2_core.infer(_decode(body, binary), requested, serving)
    all_binary = _parameter(body.parameters, "binary_data_output") is True
    as_binary = {o.name: _parameter(o.parameters, "binary_data") is True or all_binary for o in body.outputs or []}
    listed, chunks = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if as_binary.get(out.name, all_binary):
            raw = out.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = out.as_list()
        listed.append(entry)
    answer = {"model_name": serving.model.name, "model_version": v2_core.MODEL_VERSION, "outputs": listed}
    if body.id is not None:
        answer["id"] = body.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


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
