"""Text classification as the server sees it: ``POST /predict`` with ``{"text": ...}`` or
``{"texts": [...]}``, the Open Inference Protocol's ``text`` BYTES tensor (or the model's own INT64
token tensors), and ``edgekd.load(...).predict(texts)``. ``SERVING`` hands them to the server
(``edgekd.serving.family``). No torch here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import Request
from pydantic_core import to_json
from starlette.types import Scope

from edgekd.errors import DataError
from edgekd.serving.batching import InferenceEngine
from edgekd.serving.context import Serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.family import ServeFamily
from edgekd.serving.http import (
    MULTIPART,
    api_key_error,
    foreign_field,
    is_json,
    media_type,
    parse_media_type,
    read_json,
    require_json,
    validate_body,
)
from edgekd.serving.model import ServedModel
from edgekd.serving.schemas import PredictionOut, PredictRequest, PredictResponse
from edgekd.serving.settings import ServeSettings
from edgekd.serving.v2_core import INT_TYPES, ModelSpec, Output, Tensor, integers
from edgekd.tasks.text.checks import require_texts
from edgekd.tasks.text.codec import Encoded, Prediction, TextCodec

# Tokenise in a worker thread only when a request is big enough for it to matter to other requests.
INLINE_TOKENIZE_CHARS = 8_000
TEXT_INPUT = "text"  # the v2 BYTES input


# --- POST /predict ----------------------------------------------------------------------------------
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


def no_content_message(where: str) -> str:
    return (f"{where} has no content the tokenizer keeps: it encodes to special tokens only (zero-width, "
            "control or format characters such as U+200B, U+FEFF or U+00AD are dropped): send text to classify.")


async def classify(texts: list[str], serving: Serving, field: str = "texts") -> tuple[list[Encoded], np.ndarray]:
    """Tokenise and run ``texts``; returns their encodings and logits, one row per text. A text that
    tokenises to nothing but special tokens is refused (422, as an empty one) before the model runs."""
    codec = serving.model.codec
    assert isinstance(codec, TextCodec)
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
        items = codec.encode(texts)
    else:
        items = await asyncio.to_thread(codec.encode, texts)
    if (i := codec.without_content(items)) is not None:
        raise RequestError(no_content_message(field if field == "text" else f"{field}[{i}]"), 422)
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
    if given := sorted(request.query_params):
        raise RequestError(f"{', '.join(given)}: this model classifies texts and takes no query parameters "
                           "(detection models take options): leave them out.", 422)
    body = validate_body(PredictRequest, data)
    field = "text" if body.text is not None else "texts"
    texts = check_texts(body.items(), serving.settings, field)
    items, logits = await classify(texts, serving, field)
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
        {"label": p.label, "score": p.score, "probabilities": p.probabilities, "truncated": p.truncated}
        for p in codec.predictions(logits, items)
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
    items, logits = await classify(texts, serving, field)  # its refusal is answered as the route's
    return to_json({"model": serving.model.name, "target": serving.model.target,
                    "predictions": prediction_rows(codec, items, logits)})


# --- Open Inference Protocol (v2) -------------------------------------------------------------------
def _v2_texts(tensor: Tensor, settings: ServeSettings) -> list[str]:
    if tensor.datatype != "BYTES":
        raise RequestError(f"input '{TEXT_INPUT}' must have datatype BYTES (got {tensor.datatype}).")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise RequestError(f"input '{TEXT_INPUT}' must have shape [batch] or [batch, 1] (got {tensor.shape}).")
    texts: list[Any] = []
    for i, t in enumerate(tensor.data):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"texts[{i}] is not valid UTF-8: send texts as UTF-8.") from None
        texts.append(t)
    return check_texts(texts, settings, TEXT_INPUT + "s")


def _token_arrays(tensors: dict[str, Tensor], model: ServedModel, settings: ServeSettings) -> dict[str, np.ndarray]:
    codec = model.codec
    required = [n for n in codec.input_names if n != "token_type_ids"]
    missing = [n for n in required if n not in tensors]
    unknown = sorted(set(tensors) - set(codec.input_names))
    if missing or unknown:
        raise RequestError(f"send either '{TEXT_INPUT}' (BYTES) or the tensors {', '.join(codec.input_names)} "
                           f"(INT64); missing: {missing or 'none'}, unknown: {unknown or 'none'}.")
    arrays: dict[str, np.ndarray] = {}
    shape = tensors[required[0]].shape
    for name, t in tensors.items():
        if t.datatype not in INT_TYPES:
            raise RequestError(f"input '{name}' must be an integer tensor (INT64), got {t.datatype}.")
        if len(t.shape) != 2 or 0 in t.shape:
            raise RequestError(f"input '{name}' must have shape [batch, sequence] with both > 0 (got {t.shape}).")
        if t.shape != shape:
            raise RequestError(f"input '{name}' has shape {t.shape} but '{required[0]}' has {shape}: they must match.")
        arrays[name] = integers(t)
    batch, seq = shape
    if batch > settings.max_items:
        raise RequestError(f"batch of {batch}; this server takes at most {settings.max_items} rows per request.")
    if seq > codec.max_length:
        raise RequestError(f"sequence length {seq} is over this model's max_length {codec.max_length}: truncate the tokens.")
    ids = arrays.get("input_ids")
    if ids is not None and (ids.min() < 0 or ids.max() >= codec.vocab_size):
        raise RequestError(f"input_ids must lie in [0, {codec.vocab_size}) (the tokenizer's vocabulary).")
    for name in ("attention_mask", "token_type_ids"):
        if name in arrays and not np.isin(arrays[name], (0, 1)).all():
            raise RequestError(f"{name} must hold only 0 and 1.")
    if "attention_mask" in arrays and not arrays["attention_mask"].any(axis=1).all():
        raise RequestError("every row of attention_mask needs at least one 1 (a row of padding only has no text).")
    if "token_type_ids" in codec.input_names and "token_type_ids" not in arrays:
        arrays["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    return {n: arrays[n] for n in codec.input_names}


async def v2_infer(tensors: dict[str, Tensor], serving: Serving) -> dict[str, Output]:
    model, settings = serving.model, serving.settings
    codec = model.codec
    assert isinstance(codec, TextCodec)
    truncated: list[bool] | None = None
    if TEXT_INPUT in tensors:
        if len(tensors) > 1:
            raise RequestError(f"send either '{TEXT_INPUT}' alone or the token tensors, not both.")
        items, logits = await classify(_v2_texts(tensors[TEXT_INPUT], settings), serving, TEXT_INPUT + "s")
        truncated = [it.truncated for it in items]
    else:
        arrays = _token_arrays(tensors, model, settings)
        logits = (await within_deadline(serving.engine.run_arrays(arrays), settings))[serving.engine.output_name]
        serving.metrics.texts.inc(len(logits))  # a row of token tensors is one text, tokenised by the client
    logits = np.asarray(logits, dtype=np.float32)
    probs = codec.probabilities(logits).astype(np.float32)
    labels = np.asarray([codec.labels[k] for k in probs.argmax(axis=1)], dtype=object)
    outputs = {
        "probabilities": Output("probabilities", "FP32", probs),
        "logits": Output("logits", "FP32", logits),
        "label": Output("label", "BYTES", labels),
    }
    if truncated is not None:
        outputs["truncated"] = Output("truncated", "BOOL", np.asarray(truncated, dtype=bool))
    return outputs


def v2_spec(codec: TextCodec) -> ModelSpec:
    n = len(codec.labels)
    inputs = [(TEXT_INPUT, "BYTES", [-1])] + [(name, "INT64", [-1, -1]) for name in codec.input_names]
    outputs = [("probabilities", "FP32", [-1, n]), ("logits", "FP32", [-1, n]), ("label", "BYTES", [-1]),
               ("truncated", "BOOL", [-1])]
    return ModelSpec(inputs, outputs, {
        "max_length": codec.max_length,
        "inputs": f"either '{TEXT_INPUT}' (BYTES [batch]) or the INT64 token tensors "
                  f"({', '.join(codec.input_names)}) [batch, sequence]",
    }, given_with={"truncated": TEXT_INPUT},  # token tensors come tokenised: nothing was cut here
        optional=frozenset(name for name, _, _ in inputs),  # text or the token tensors: none always needed
        class_outputs=("probabilities", "logits"))  # one score per label each


# --- edgekd.load(...).predict -------------------------------------------------------------------------
def predict_local(codec: TextCodec, engine: InferenceEngine, texts: Any, batch_size: int,
                  options: dict[str, Any]) -> list[Prediction]:
    """A text or a list of texts -> one Prediction (label, score, probabilities, truncated) each."""
    if options:
        raise TypeError(f"{', '.join(sorted(options))}: text models take no options (detection models do).")
    texts = _text_list(texts)
    if not texts:
        raise DataError("no texts to classify: give a text or a list of texts.")
    require_texts(texts, "give text to classify")
    out: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        items = codec.encode(texts[start:start + batch_size])
        if (i := codec.without_content(items)) is not None:
            raise DataError(no_content_message(f"text {start + i}"))
        logits = engine.run_items(items)[engine.output_name]
        out += codec.predictions(logits, items)
    return out


def _text_list(texts: Any) -> list[Any]:
    """What ``predict`` was given, as a list of texts; a type that is neither a text nor a list of them is
    refused, saying what to pass (not the items of bytes, a mapping's keys or Python's "not iterable")."""
    if isinstance(texts, str):
        return [texts]
    what = f"predict takes a text (a string) or a list of texts (strings), not {type(texts).__name__}"
    if isinstance(texts, (bytes, bytearray, memoryview)):
        raise DataError(f"{what}: decode bytes to a string first (e.g. data.decode('utf-8')).")
    if isinstance(texts, Mapping) or not isinstance(texts, Iterable):
        raise DataError(f"{what}.")
    return list(texts)


SERVING = ServeFamily(
    task=TextCodec.task,
    accepts=TextCodec.accepts,
    codec=TextCodec.for_artifact,
    predict=predict_texts,
    response_model=PredictResponse,
    request_models=(PredictRequest,),
    openapi_content={"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    v2_spec=v2_spec,
    v2_infer=v2_infer,
    max_batch=lambda settings: settings.max_items,
    local_predict=predict_local,
    fast_predict=fast_predict,
)
