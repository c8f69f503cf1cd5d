"""POST /predict: texts in, labels and probabilities out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import numpy as np
from fastapi import APIRouter, Depends

from edgekd.serving.codec import Encoded
from edgekd.serving.context import Serving, get_serving
from edgekd.serving.errors import DeadlineError, RequestError
from edgekd.serving.http import require_api_key, require_json
from edgekd.serving.schemas import ErrorBody, PredictionOut, PredictRequest, PredictResponse
from edgekd.serving.settings import ServeSettings

T = TypeVar("T")

# Tokenise in a worker thread only when a request is big enough for it to matter to other requests.
INLINE_TOKENIZE_CHARS = 8_000

ERRORS = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON."},
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    413: {"model": ErrorBody, "description": "The body is over the size limit."},
    415: {"model": ErrorBody, "description": "The body is not JSON."},
    422: {"model": ErrorBody, "description": "The texts break a limit (empty, too many, too long)."},
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
        out.append(t)
    return out


async def within_deadline(awaitable: Awaitable[T], settings: ServeSettings) -> T:
    try:
        return await asyncio.wait_for(awaitable, settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineError(f"the model did not answer within {settings.request_timeout_s:g} s "
                            "(request_timeout_s): retry, send fewer texts, or use a less loaded server.") from None


async def classify(texts: list[str], serving: Serving) -> tuple[list[Encoded], np.ndarray]:
    """Tokenise and run ``texts``; returns their encodings and logits, one row per text."""
    codec = serving.model.codec
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        items = codec.encode(texts)
    else:
        items = await asyncio.to_thread(codec.encode, texts)
    logits = await within_deadline(serving.engine.logits(items), serving.settings)
    serving.metrics.texts.inc(len(items))
    if n_cut := sum(it.truncated for it in items):
        serving.metrics.truncated.inc(n_cut)
    return items, logits


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, dependencies=[Depends(require_json)],
             summary="Classify one text or a list of texts")
async def predict(body: PredictRequest, serving: Serving = Depends(get_serving)) -> PredictResponse:
    texts = check_texts(body.items(), serving.settings, "text" if body.text is not None else "texts")
    items, logits = await classify(texts, serving)
    preds = serving.model.codec.predictions(logits)
    return PredictResponse(
        model=serving.model.name,
        target=serving.model.target,
        predictions=[
            PredictionOut(label=p.label, score=p.score, probabilities=p.probabilities, truncated=it.truncated)
            for p, it in zip(preds, items, strict=True)
        ],
    )
