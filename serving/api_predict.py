"""POST /predict: what the served model's task family reads, answered as that family answers.

The route reads its body itself (a detection model also takes multipart forms, which FastAPI cannot
declare beside a JSON body) and hands the request to the served family's handler
(``ServeFamily.predict``, from the family's ``serve.py``), its body inflated first when it comes with
``Content-Encoding`` gzip or deflate (as the v2 infer route reads it: at most to the body limit). The
OpenAPI document describes the bodies of every registered family until a model is loaded, then the
served one's (``ServeFamily.openapi``).
"""

from __future__ import annotations

from typing import Any, Union

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import Scope

from edgekd.serving.context import Serving, get_serving
from edgekd.serving.family import serve_families
from edgekd.serving.http import decoded_request, require_api_key
from edgekd.serving.schemas import ErrorBody, InferenceRequest

__all__ = ["ERRORS", "fast_predict", "openapi_components", "router"]

ERRORS = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON (or not a readable multipart form, or "
                                             "not valid data of its Content-Encoding)."},
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    413: {"model": ErrorBody, "description": "The body is over the size limit (also once inflated), or an image "
                                             "has too many pixels."},
    415: {"model": ErrorBody, "description": "The body is not JSON (detection models: nor a multipart form), or "
                                             "its Content-Encoding is not gzip or deflate."},
    422: {"model": ErrorBody, "description": "The inputs break a limit (empty, too many, too long, not an image), "
                                             "or are not what this model takes (texts vs images)."},
    503: {"model": ErrorBody, "description": "Overloaded, shutting down or not ready; retry."},
    504: {"model": ErrorBody, "description": "The request took longer than the server's time limit."},
}

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])


def _every_family() -> dict[str, Any]:
    """/predict's body and parameters as every registered family reads them (before a model loads)."""
    bodies: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, dict[str, Any]] = {}
    for family in serve_families():
        for media, body in family.openapi_content.items():
            bodies.setdefault(media, []).append(body["schema"])
        for p in family.openapi_parameters:
            params.setdefault(p["name"], p)
    content = {m: {"schema": s[0] if len(s) == 1 else {"oneOf": s}} for m, s in bodies.items()}
    return {"requestBody": {"required": True, "content": content}, "parameters": list(params.values())}


_OPENAPI = _every_family()
_RESPONSES = tuple(f.response_model for f in serve_families())


async def fast_predict(scope: Scope, body: bytes) -> bytes | None:
    """POST /predict answered from the ASGI middleware by the served family's fast path, when it has
    one and the request is its common shape; None: the route answers (every error stays the route's),
    as it does every compressed body."""
    if any(name == b"content-encoding" for name, _ in scope["headers"]):
        return None
    serving: Serving | None = scope["app"].state.serving
    fast = serving.model.family.fast_predict if serving is not None else None
    return None if fast is None else await fast(scope, body)


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the bodies /predict reads itself, for the OpenAPI document's components."""
    bodies = [m for f in serve_families() for m in f.request_models] + [InferenceRequest]
    _, top = models_json_schema([(m, "validation") for m in bodies],
                                ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


@router.post("/predict", response_model=Union[_RESPONSES], responses=ERRORS,  # noqa: UP007 (a runtime tuple)
             openapi_extra=_OPENAPI,
             summary="Classify texts, or detect objects in images (whichever the served model does)")
async def predict(request: Request, serving: Serving = Depends(get_serving)) -> BaseModel:
    """A text model takes JSON `{"text": ...}` or `{"texts": [...]}`. A detection model takes images as
    multipart/form-data parts `file`/`files`, or JSON `{"image": b64}` / `{"images": [b64, ...]}`,
    with options `conf_threshold`, `iou_threshold`, `max_det` (query, form fields or JSON keys)."""
    request = await decoded_request(request, serving.settings.max_body_bytes)
    return await serving.model.family.predict(request, serving)
