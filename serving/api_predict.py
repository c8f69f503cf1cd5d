"""POST /predict: texts in, labels and probabilities out; or images in, boxes out.

The route reads its body itself (a detection model also takes multipart forms, which FastAPI cannot
declare beside a JSON body) and hands the request to the handler of what the served codec accepts
(``PREDICTORS``); the OpenAPI document still describes both bodies (``openapi_components``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import to_json
from starlette.types import Scope

from edgekd.serving.api_detect import OPTIONS, predict_images
from edgekd.serving.codec import Encoded, TextCodec
from edgekd.serving.context import Serving, get_serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.http import (
    MULTIPART,
    api_key_error,
    foreign_field,
    is_json,
    media_type,
    parse_media_type,
    read_json,
    require_api_key,
    require_json,
    validate_body,
)
from edgekd.serving.schemas import (
    DetectOptions,
    DetectRequest,
    DetectResponse,
    ErrorBody,
    InferenceRequest,
    PredictionOut,
    PredictRequest,
    PredictResponse,
)
from edgekd.serving.settings import ServeSettings
from edgekd.serving.vision import DetectionCodec

__all__ = ["ERRORS", "check_texts", "classify", "fast_predict", "router", "within_deadline"]

# Tokenise in a worker thread only when a request is big enough for it to matter to other requests.
INLINE_TOKENIZE_CHARS = 8_000

ERRORS = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON (or not a readable multipart form)."},
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    413: {"model": ErrorBody, "description": "The body is over the size limit, or an image has too many pixels."},
    415: {"model": ErrorBody, "description": "The body is not JSON (detection models: nor a multipart form)."},
    422: {"model": ErrorBody, "description": "The inputs break a limit (empty, too many, too long, not an image), "
                                             "or are not what this model takes (texts vs images)."},
    503: {"model": ErrorBody, "description": "Overloaded, shutting down or not ready; retry."},
    504: {"model": ErrorBody, "description": "The request took longer than the server's time limit."},
}

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])


def check_texts(texts: Sequence[object], settings: ServeSettings, field: str = "texts") -> list[str]:
    """The request limits every text route shares, each refusal saying what to change."""
    if not texts:
        raise RequestError(f"'{field}' is empty: send at least one text.", 422)
    if len(texts) > settings.max_items:
        raise RequestError(f"{len(texts)} texts in one request; this server takes at most {settings.max_items}: "
                           "split the request.", 422)
    out = []
    for i, t in enumerate(texts):
        where = field if field == "text" else f"{field}[{i}]"
        if not isinstance(t, str):
            raise RequestError(f"{where} is not a string (got {type(t).__name__}).", 422)
        if not t.strip():
            raise RequestError(f"{where} is empty or only whitespace: send text to classify.", 422)
        if len(t) > settings.max_text_chars:
            raise RequestError(f"{where} has {len(t)} characters; this server takes at most "
                               f"{settings.max_text_chars}: shorten it.", 422)
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" alone decodes to a str no tokenizer takes
                raise RequestError(f"{where} holds a lone surrogate (U+{ord(t[e.start]):04X}) at character "
                                   f"{e.start}: send valid Unicode (surrogates only in pairs).", 422) from None
        out.append(t)
    return out


async def classify(texts: list[str], serving: Serving) -> tuple[list[Encoded], np.ndarray]:
    """Tokenise and run ``texts``; returns their encodings and logits, one row per text."""
    codec = serving.model.codec
    assert isinstance(codec, TextCodec)
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        items = codec.encode(texts)
    else:
        items = await asyncio.to_thread(codec.encode, texts)
    logits = await within_deadline(serving.engine.logits(items), serving.settings)
    serving.metrics.texts.inc(len(items))
    if n_cut := sum(it.truncated for it in items):
        serving.metrics.truncated.inc(n_cut)
    return items, logits


IMAGES_HERE = ('this model classifies texts and takes no images: send JSON {"text": "..."} or '
               '{"texts": ["...", ...]}.')


async def predict_texts(request: Request, serving: Serving) -> PredictResponse:
    """Classify the texts of one /predict request."""
    if media_type(request) == MULTIPART:
        raise RequestError(IMAGES_HERE, 422)
    await require_json(request)
    data = await read_json(request)
    if isinstance(data, dict) and {"image", "images"} & data.keys():
        raise RequestError(IMAGES_HERE, 422)
    if isinstance(data, dict) and (other := foreign_field(data, "text", "texts")):
        raise RequestError(other, 422)
    given = sorted(set(request.query_params) & set(OPTIONS))
    if given:
        raise RequestError(f"{', '.join(given)} applies to detection models; this model classifies texts: "
                           "leave it out.", 422)
    body = validate_body(PredictRequest, data)
    texts = check_texts(body.items(), serving.settings, "text" if body.text is not None else "texts")
    items, logits = await classify(texts, serving)
    codec = serving.model.codec
    assert isinstance(codec, TextCodec)
    return PredictResponse(
        model=serving.model.name,
        target=serving.model.target,
        predictions=[PredictionOut(**row) for row in prediction_rows(codec, items, logits)],
    )


def prediction_rows(codec: TextCodec, items: list[Encoded], logits: np.ndarray) -> list[dict[str, Any]]:
    """The ``predictions`` of a /predict answer, one per text, as ``PredictionOut`` fields."""
    return [
        {"label": p.label, "score": p.score, "probabilities": p.probabilities, "truncated": it.truncated}
        for p, it in zip(codec.predictions(logits), items, strict=True)
    ]


async def fast_predict(scope: Scope, body: bytes) -> bytes | None:
    """POST /predict of a text model, answered straight from the ASGI middleware: what the route does
    for a well-formed request, without FastAPI's routing, dependency resolution and response-model
    validation, which cost more than the model itself at batch 1. Returns the JSON answer, or None
    for anything else (another media type, query options, a detection model, an API-key or body
    problem, not ready...), which the route then handles, so every error and message stays its."""
    app = scope["app"]
    serving: Serving | None = app.state.serving
    # Overridden dependencies (get_serving, require_api_key...) are honoured by the route only.
    if serving is None or scope["query_string"] or app.dependency_overrides:
        return None
    codec = serving.model.codec
    if not isinstance(codec, TextCodec):
        return None
    content_type = x_api_key = authorization = None
    for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get reads them
        if name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1")
        elif name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    if content_type is None or not is_json(parse_media_type(content_type)):
        return None
    if api_key_error(app.state.settings.api_key, x_api_key, authorization or "") is not None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # the route answers them (400)
        return None
    # Exactly PredictRequest's valid shapes: {"text": str} or {"texts": [str, ...]}.
    if type(data) is not dict or len(data) != 1:
        return None
    if type(text := data.get("text")) is str:
        texts, field = [text], "text"
    elif type(texts := data.get("texts")) is list and all(type(t) is str for t in texts):
        field = "texts"
    else:
        return None
    try:
        texts = check_texts(texts, serving.settings, field)
    except RequestError:
        return None
    items, logits = await classify(texts, serving)
    return to_json({"model": serving.model.name, "target": serving.model.target,
                    "predictions": prediction_rows(codec, items, logits)})


# What each codec accepts -> its /predict handler: the one place the route depends on the task.
PREDICTORS: dict[str, Callable[[Request, Serving], Awaitable[BaseModel]]] = {
    TextCodec.accepts: predict_texts,
    DetectionCodec.accepts: predict_images,
}

_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "One image file."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Several image files (repeat the part)."},
        **{name: {"type": "string", "description": f.description} for name, f in DetectOptions.model_fields.items()},
    },
}
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/PredictRequest"},
                                                       {"$ref": "#/components/schemas/DetectRequest"}]}},
            MULTIPART: {"schema": _FORM_SCHEMA},
        },
    },
    "parameters": [
        {"name": name, "in": "query", "required": False,
         "description": f"Detection models only. {f.description} Default {f.default}.",
         "schema": {"type": "integer" if f.annotation is int else "number"}}
        for name, f in DetectOptions.model_fields.items()
    ],
}


def openapi_for(accepts: str) -> dict[str, Any]:
    """/predict's request body and parameters for a model that takes ``accepts`` (texts or images)."""
    if accepts == TextCodec.accepts:
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}}, "parameters": []}
    content = _OPENAPI["requestBody"]["content"]
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/DetectRequest"}}, MULTIPART: content[MULTIPART]}},
        "parameters": _OPENAPI["parameters"]}


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the bodies /predict reads itself, for the OpenAPI document's components."""
    _, top = models_json_schema([(PredictRequest, "validation"), (DetectRequest, "validation"),
                                 (InferenceRequest, "validation")],
                                ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


@router.post("/predict", response_model=PredictResponse | DetectResponse, responses=ERRORS, openapi_extra=_OPENAPI,
             summary="Classify texts, or detect objects in images (whichever the served model does)")
async def predict(request: Request, serving: Serving = Depends(get_serving)) -> BaseModel:
    """A text model takes JSON `{"text": ...}` or `{"texts": [...]}`. A detection model takes images as
    multipart/form-data parts `file`/`files`, or JSON `{"image": b64}` / `{"images": [b64, ...]}`,
    with options `conf_threshold`, `iou_threshold`, `max_det` (query, form fields or JSON keys)."""
    return await PREDICTORS[serving.model.codec.accepts](request, serving)
