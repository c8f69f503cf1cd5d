"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP): health, metadata and inference.

Text models: texts go in as a BYTES tensor named ``text``; probabilities come out as FP32. Clients
that tokenise themselves send the model's own INT64 tensors (``input_ids``, ``attention_mask``).
Detection models: the raw FP32 ``images`` tensor [B,3,S,S] (RGB in 0..1, letterboxed) goes in and
the raw outputs come out (``boxes`` and ``scores``, or ``detections``), as Triton serves them: the
client letterboxes and runs NMS. Errors are ``{"error": "..."}`` with status 400 (404 for an
unknown model), as the protocol says.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

import edgekd
from edgekd.serving.api_predict import ERRORS, check_texts, classify
from edgekd.serving.codec import TextCodec
from edgekd.serving.context import Serving, get_serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.http import require_api_key, require_json
from edgekd.serving.model import ServedModel
from edgekd.serving.schemas import (
    ErrorBody,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadataResponse,
    Parameters,
    RequestInput,
    ResponseOutput,
    ServerMetadataResponse,
)
from edgekd.serving.settings import ServeSettings
from edgekd.serving.vision import PAD_VALUE, DetectionCodec

TEXT_INPUT = "text"
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}

health = APIRouter(prefix="/v2", tags=["v2 health"])
router = APIRouter(prefix="/v2", tags=["v2 inference"], dependencies=[Depends(require_api_key)])


async def named_model(name: str, serving: Serving = Depends(get_serving)) -> Serving:
    """The serving context when ``name`` is the served model's name; 404 otherwise."""
    if name != serving.model.name:
        raise RequestError(f"unknown model '{name}': this server serves '{serving.model.name}'.", 404, "not_found")
    return serving


@health.get("/health/live", summary="Server live (200, empty body)")
async def live() -> Response:
    return Response(status_code=200)


@health.get("/health/ready", summary="Server ready (200 when the model is loaded, else 400)")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if getattr(request.app.state, "ready", False) else 400)


@router.get("/models/{name}/ready", summary="Model ready")
async def model_ready(request: Request, serving: Serving = Depends(named_model)) -> Response:
    return Response(status_code=200 if getattr(request.app.state, "ready", False) else 400)


@router.get("", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata() -> ServerMetadataResponse:
    return ServerMetadataResponse(name="edgekd", version=edgekd.__version__, extensions=[])


Tensors = tuple[list[MetadataTensor], list[MetadataTensor], Parameters]


def _text_tensors(codec: TextCodec) -> Tensors:
    n = len(codec.labels)
    inputs = [MetadataTensor(name=TEXT_INPUT, datatype="BYTES", shape=[-1])]
    inputs += [MetadataTensor(name=name, datatype="INT64", shape=[-1, -1]) for name in codec.input_names]
    outputs = [
        MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, n]),
        MetadataTensor(name="logits", datatype="FP32", shape=[-1, n]),
        MetadataTensor(name="label", datatype="BYTES", shape=[-1]),
        MetadataTensor(name="truncated", datatype="BOOL", shape=[-1]),
    ]
    return inputs, outputs, {
        "max_length": codec.max_length,
        "inputs": f"either '{TEXT_INPUT}' (BYTES [batch]) or the INT64 token tensors "
                  f"({', '.join(codec.input_names)}) [batch, sequence]",
    }


def _image_tensors(codec: DetectionCodec) -> Tensors:
    s = codec.image_size
    inputs = [MetadataTensor(name=codec.input_name, datatype="FP32", shape=[-1, 3, s, s])]
    outputs = [MetadataTensor(name=n, datatype="FP32", shape=[-1, *codec.output_shapes[n]]) for n in codec.outputs]
    return inputs, outputs, {
        "task": codec.task,
        "image_size": s,
        "nms_in_graph": codec.nms_in_graph,
        "inputs": f"'{codec.input_name}' FP32 [batch, 3, {s}, {s}]: RGB in 0..1, letterboxed (aspect kept, padded "
                  f"with {PAD_VALUE}/255); outputs are raw (xyxy in input pixels): for boxes in image pixels "
                  "after NMS, POST the image files to /predict",
    }


@router.get("/models/{name}", response_model=ModelMetadataResponse, response_model_exclude_none=True,
            responses={404: {"model": ErrorBody, "description": "Unknown model."}}, summary="Model metadata")
async def model_metadata(serving: Serving = Depends(named_model)) -> ModelMetadataResponse:
    model = serving.model
    codec = model.codec
    inputs, outputs, params = METADATA[codec.accepts](codec)
    return ModelMetadataResponse(
        name=model.name, platform=model.platform, inputs=inputs, outputs=outputs,
        parameters={"target": model.target, "labels": ",".join(codec.labels), **params},
    )


# --- request decoding -----------------------------------------------------------------------------------
def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _flat_data(tensor: RequestInput) -> list[Any]:
    flat = _flatten(tensor.data)
    want = math.prod(tensor.shape)
    if len(flat) != want:
        raise RequestError(f"input '{tensor.name}' has shape {tensor.shape} ({want} elements) but its data holds "
                            f"{len(flat)}: make shape and data agree.")
    return flat


def _texts(tensor: RequestInput, settings: ServeSettings) -> list[str]:
    if tensor.datatype != "BYTES":
        raise RequestError(f"input '{TEXT_INPUT}' must have datatype BYTES (got {tensor.datatype}).")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise RequestError(f"input '{TEXT_INPUT}' must have shape [batch] or [batch, 1] (got {tensor.shape}).")
    texts = _flat_data(tensor)
    return check_texts(texts, settings, TEXT_INPUT + "s")


def _token_arrays(tensors: dict[str, RequestInput], model: ServedModel, settings: ServeSettings) -> dict[str, np.ndarray]:
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
        flat = _flat_data(t)
        if not all(type(v) is int for v in flat):
            raise RequestError(f"input '{name}' holds non-integer values: send whole numbers.")
        arrays[name] = np.asarray(flat, dtype=np.int64).reshape(t.shape)
    batch, seq = shape
    if batch > settings.max_items:
        raise RequestError(f"batch of {batch}; this server takes at most {settings.max_items} rows per request.")
    if seq > codec.max_length:
        raise RequestError(f"sequence length {seq} is over this model's max_length {codec.max_length}: truncate the tokens.")
    ids = arrays["input_ids"] if "input_ids" in arrays else None
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


def _select(outputs: dict[str, ResponseOutput], body: InferenceRequest) -> list[ResponseOutput]:
    if not body.outputs:
        return list(outputs.values())
    unknown = [o.name for o in body.outputs if o.name not in outputs]
    if unknown:
        raise RequestError(f"unknown output(s) {unknown}; this model gives {', '.join(outputs)}.")
    return [outputs[o.name] for o in body.outputs]


async def _infer_texts(tensors: dict[str, RequestInput], serving: Serving) -> dict[str, ResponseOutput]:
    model, settings = serving.model, serving.settings
    codec = model.codec
    assert isinstance(codec, TextCodec)
    truncated: list[bool] | None = None
    if TEXT_INPUT in tensors:
        if len(tensors) > 1:
            raise RequestError(f"send either '{TEXT_INPUT}' alone or the token tensors, not both.")
        items, logits = await classify(_texts(tensors[TEXT_INPUT], settings), serving)
        truncated = [it.truncated for it in items]
    else:
        arrays = _token_arrays(tensors, model, settings)
        logits = (await within_deadline(serving.engine.run_arrays(arrays), settings))[serving.engine.output_name]
    logits = np.asarray(logits, dtype=np.float32)
    probs = codec.probabilities(logits).astype(np.float32)
    n, c = probs.shape
    outputs = {
        "probabilities": ResponseOutput(name="probabilities", shape=[n, c], datatype="FP32",
                                        data=probs.reshape(-1).tolist()),
        "logits": ResponseOutput(name="logits", shape=[n, c], datatype="FP32", data=logits.reshape(-1).tolist()),
        "label": ResponseOutput(name="label", shape=[n], datatype="BYTES",
                                data=[codec.labels[k] for k in probs.argmax(axis=1)]),
    }
    if truncated is not None:
        outputs["truncated"] = ResponseOutput(name="truncated", shape=[n], datatype="BOOL", data=truncated)
    return outputs


def _image_array(tensors: dict[str, RequestInput], codec: DetectionCodec, settings: ServeSettings) -> np.ndarray:
    name, s = codec.input_name, codec.image_size
    if set(tensors) != {name}:
        raise RequestError(f"this model detects objects: send one input '{name}' (FP32 [batch, 3, {s}, {s}], RGB in "
                           f"0..1, letterboxed), got {sorted(tensors)}; or POST image files to /predict.")
    t = tensors[name]
    if t.datatype not in FLOAT_TYPES:
        raise RequestError(f"input '{name}' must be a float tensor (FP32), got {t.datatype}.")
    if len(t.shape) != 4 or t.shape[1:] != [3, s, s] or t.shape[0] == 0:
        raise RequestError(f"input '{name}' must have shape [batch, 3, {s}, {s}] with batch > 0 (got {t.shape}): "
                           f"letterbox images to {s}x{s}, channels first.")
    if t.shape[0] > settings.max_images:
        raise RequestError(f"batch of {t.shape[0]}; this server takes at most {settings.max_images} images per "
                           "request (max_images).")
    flat = _flat_data(t)
    if not all(type(v) in (int, float) for v in flat):
        raise RequestError(f"input '{name}' holds non-numeric values: send numbers (RGB in 0..1).")
    arr = np.asarray(flat, dtype=np.float32).reshape(t.shape)
    if not np.isfinite(arr).all():
        raise RequestError(f"input '{name}' holds NaN or infinite values: send RGB values in 0..1.")
    return arr


async def _infer_images(tensors: dict[str, RequestInput], serving: Serving) -> dict[str, ResponseOutput]:
    codec = serving.model.codec
    assert isinstance(codec, DetectionCodec)
    arr = _image_array(tensors, codec, serving.settings)
    out = await within_deadline(serving.engine.run_arrays({codec.input_name: arr}), serving.settings)
    serving.metrics.images.inc(len(arr))
    outputs = {}
    for name in codec.outputs:
        value = np.asarray(out[name], dtype=np.float32)
        outputs[name] = ResponseOutput(name=name, shape=list(value.shape), datatype="FP32",
                                       data=value.reshape(-1).tolist())
    return outputs


# What each codec accepts -> its v2 metadata and inference: the one place v2 depends on the task.
METADATA: dict[str, Callable[[Any], Tensors]] = {
    TextCodec.accepts: _text_tensors, DetectionCodec.accepts: _image_tensors,
}
INFER: dict[str, Callable[[dict[str, RequestInput], Serving], Awaitable[dict[str, ResponseOutput]]]] = {
    TextCodec.accepts: _infer_texts, DetectionCodec.accepts: _infer_images,
}


@router.post("/models/{name}/infer", response_model=InferenceResponse, response_model_exclude_none=True,
             responses={**ERRORS, 404: {"model": ErrorBody, "description": "Unknown model."}}, dependencies=[Depends(require_json)],
             summary="Inference (Open Inference Protocol v2)")
async def infer(body: InferenceRequest, serving: Serving = Depends(named_model)) -> InferenceResponse:
    tensors = {t.name: t for t in body.inputs}
    if len(tensors) != len(body.inputs):
        raise RequestError("an input name appears more than once: send each input once.")
    outputs = await INFER[serving.model.codec.accepts](tensors, serving)
    return InferenceResponse(model_name=serving.model.name, id=body.id, outputs=_select(outputs, body))
