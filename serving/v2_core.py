"""The Open Inference Protocol v2, transport-agnostic: typed tensors in, typed tensors out.

HTTP/JSON, HTTP with Triton's binary tensor data extension (``api_v2``) and gRPC (``grpc_v2``) all
decode their requests into ``Tensor``s and encode the same ``Output``s, so the three answer alike.
Every value is checked (datatype, shape, element count, integer range, UTF-8) before it reaches
numpy, the tokenizer or the model: a bad tensor is a 400 that names it, never a 500.

Text models: texts go in as a BYTES tensor named ``text``; probabilities come out as FP32. Clients
that tokenise themselves send the model's own INT64 tensors (``input_ids``, ``attention_mask``).
Detection models: the raw FP32 ``images`` tensor [B,3,S,S] (RGB in 0..1, letterboxed) goes in and
the raw outputs come out (``boxes`` and ``scores``, or ``detections``), as Triton serves them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekd.serving.api_predict import check_texts, classify
from edgekd.serving.codec import TextCodec
from edgekd.serving.context import Serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.model import ServedModel
from edgekd.serving.settings import ServeSettings
from edgekd.serving.vision import PAD_VALUE, DetectionCodec

TEXT_INPUT = "text"
MODEL_VERSION = "1"  # one artifact per server: its only version
# Fixed-size datatypes of the protocol and their little-endian numpy types (BYTES is length-prefixed).
NUMPY_TYPES = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class Tensor:
    """One decoded input: ``data`` is flat, row-major, and holds exactly prod(shape) elements
    (a list of JSON values, a list of bytes for binary BYTES, or a numpy array)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | np.ndarray


@dataclass
class Output:
    """One output; ``values`` is a numpy array (BYTES: an object array of str)."""

    name: str
    datatype: str
    values: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.values.shape)

    def as_list(self) -> list[Any]:
        return self.values.reshape(-1).tolist()

    def raw(self) -> bytes:
        """The binary tensor data: little-endian, row-major; BYTES as 4-byte length + UTF-8 bytes."""
        if self.datatype == "BYTES":
            parts = [str(v).encode("utf-8") for v in self.values.reshape(-1)]
            return b"".join(struct.pack("<I", len(p)) + p for p in parts)
        return np.ascontiguousarray(self.values, dtype=NUMPY_TYPES[self.datatype]).tobytes()


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list | tuple) or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape):
        raise RequestError(f"input '{name}' needs a shape of whole numbers >= 0 (got {shape!r}).")
    return list(shape)


def flatten(data: list[Any]) -> list[Any]:
    """Nested lists flattened row-major, without recursion (any depth the JSON parser allowed)."""
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


def from_values(name: str, datatype: str, shape: list[int], values: list[Any]) -> Tensor:
    """A tensor from values sent in the request itself (JSON ``data``, gRPC ``contents``)."""
    want = math.prod(shape)
    if len(values) != want:
        raise RequestError(f"input '{name}' has shape {shape} ({want} elements) but its data holds "
                           f"{len(values)}: make shape and data agree.")
    return Tensor(name, datatype, shape, values)


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its binary tensor data (HTTP binary extension, gRPC ``raw_input_contents``)."""
    want = math.prod(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        pos, size = 0, len(raw)
        while pos < size:
            if pos + 4 > size:
                raise RequestError(f"input '{name}': BYTES data ends inside an element's 4-byte length.")
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > size:
                raise RequestError(f"input '{name}': a BYTES element says {n} bytes but the data ends before.")
            items.append(bytes(raw[pos + 4:pos + 4 + n]))
            pos += 4 + n
        return from_values(name, datatype, shape, items)
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise RequestError(f"input '{name}' has datatype {datatype}, which this server does not read; "
                           f"use one of BYTES, {', '.join(NUMPY_TYPES)}.")
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != want * itemsize:
        raise RequestError(f"input '{name}' has shape {shape} of {datatype} ({want * itemsize} bytes) but its "
                           f"binary data has {len(raw)} bytes: make shape and data agree.")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype))


# --- text models ----------------------------------------------------------------------------------------
def _texts(tensor: Tensor, settings: ServeSettings) -> list[str]:
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


def _integers(t: Tensor) -> np.ndarray:
    """The tensor's values as int64, refusing anything that is not a whole number within int64."""
    if isinstance(t.data, np.ndarray):
        if t.data.dtype.kind not in "iu":
            raise RequestError(f"input '{t.name}' must be an integer tensor (INT64), got {t.datatype}.")
        if t.data.dtype.kind == "u" and t.data.size and int(t.data.max()) > INT64_MAX:
            raise RequestError(f"input '{t.name}' holds values over {INT64_MAX} (int64's range).")
        return t.data.astype(np.int64).reshape(t.shape)
    if not all(type(v) is int for v in t.data):
        raise RequestError(f"input '{t.name}' holds non-integer values: send whole numbers.")
    if t.data and (min(t.data) < INT64_MIN or max(t.data) > INT64_MAX):
        raise RequestError(f"input '{t.name}' holds values outside int64's range [{INT64_MIN}, {INT64_MAX}].")
    return np.asarray(t.data, dtype=np.int64).reshape(t.shape)


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
        arrays[name] = _integers(t)
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


async def _infer_texts(tensors: dict[str, Tensor], serving: Serving) -> dict[str, Output]:
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
    labels = np.asarray([codec.labels[k] for k in probs.argmax(axis=1)], dtype=object)
    outputs = {
        "probabilities": Output("probabilities", "FP32", probs),
        "logits": Output("logits", "FP32", logits),
        "label": Output("label", "BYTES", labels),
    }
    if truncated is not None:
        outputs["truncated"] = Output("truncated", "BOOL", np.asarray(truncated, dtype=bool))
    return outputs


# --- detection models -----------------------------------------------------------------------------------
def _image_array(tensors: dict[str, Tensor], codec: DetectionCodec, settings: ServeSettings) -> np.ndarray:
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
    if not isinstance(t.data, np.ndarray) and not all(type(v) in (int, float) for v in t.data):
        raise RequestError(f"input '{name}' holds non-numeric values: send numbers (RGB in 0..1).")
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused just below
            arr = np.asarray(t.data, dtype=np.float32).reshape(t.shape)
    except OverflowError:  # a JSON integer beyond any float (10**400)
        raise RequestError(f"input '{name}' holds a number too large for FP32: send RGB values in 0..1.") from None
    if not np.isfinite(arr).all():
        raise RequestError(f"input '{name}' holds NaN or infinite values: send RGB values in 0..1.")
    return arr


async def _infer_images(tensors: dict[str, Tensor], serving: Serving) -> dict[str, Output]:
    codec = serving.model.codec
    assert isinstance(codec, DetectionCodec)
    arr = _image_array(tensors, codec, serving.settings)
    out = await within_deadline(serving.engine.run_arrays({codec.input_name: arr}), serving.settings)
    serving.metrics.images.inc(len(arr))
    return {name: Output(name, "FP32", np.asarray(out[name], dtype=np.float32)) for name in codec.outputs}


# --- metadata -------------------------------------------------------------------------------------------
TensorSpec = tuple[str, str, list[int]]  # name, datatype, shape (-1: variable)


@dataclass
class ModelSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Any]


def _text_spec(codec: TextCodec) -> ModelSpec:
    n = len(codec.labels)
    inputs = [(TEXT_INPUT, "BYTES", [-1])] + [(name, "INT64", [-1, -1]) for name in codec.input_names]
    outputs = [("probabilities", "FP32", [-1, n]), ("logits", "FP32", [-1, n]), ("label", "BYTES", [-1]),
               ("truncated", "BOOL", [-1])]
    return ModelSpec(inputs, outputs, {
        "max_length": codec.max_length,
        "inputs": f"either '{TEXT_INPUT}' (BYTES [batch]) or the INT64 token tensors "
                  f"({', '.join(codec.input_names)}) [batch, sequence]",
    })


def _image_spec(codec: DetectionCodec) -> ModelSpec:
    s = codec.image_size
    outputs = [(n, "FP32", [-1, *codec.output_shapes[n]]) for n in codec.outputs]
    return ModelSpec([(codec.input_name, "FP32", [-1, 3, s, s])], outputs, {
        "task": codec.task,
        "image_size": s,
        "nms_in_graph": codec.nms_in_graph,
        "inputs": f"'{codec.input_name}' FP32 [batch, 3, {s}, {s}]: RGB in 0..1, letterboxed (aspect kept, padded "
                  f"with {PAD_VALUE}/255); outputs are raw (xyxy in input pixels): for boxes in image pixels "
                  "after NMS, POST the image files to /predict",
    })


def model_spec(model: ServedModel) -> ModelSpec:
    spec = SPECS[model.codec.accepts](model.codec)
    spec.parameters = {"target": model.target, "labels": ",".join(model.codec.labels), **spec.parameters}
    return spec


def model_config(model: ServedModel, settings: ServeSettings) -> dict[str, Any]:
    """The model's configuration in Triton's JSON shape (``/v2/models/{name}/config``): the batch
    dimension is implied by ``max_batch_size``, so ``dims`` leave it out."""
    spec = model_spec(model)
    batch = settings.max_images if model.codec.accepts == "images" else settings.max_items

    def triton(t: TensorSpec) -> dict[str, Any]:
        name, datatype, shape = t
        return {"name": name, "data_type": "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}",
                "dims": shape[1:] or [1]}

    return {"name": model.name, "platform": model.platform, "backend": "edgekd", "max_batch_size": batch,
            "input": [triton(t) for t in spec.inputs], "output": [triton(t) for t in spec.outputs],
            "parameters": {k: {"string_value": str(v)} for k, v in spec.parameters.items()}}


# --- dispatch -------------------------------------------------------------------------------------------
def check_model(serving: Serving, name: str, version: str | None = None) -> None:
    """404 unless ``name`` (and ``version``, when given) is what this server serves."""
    if name != serving.model.name:
        raise RequestError(f"unknown model '{name}': this server serves '{serving.model.name}'.", 404, "not_found")
    if version not in (None, "", MODEL_VERSION):
        raise RequestError(f"model '{name}' has no version '{version}': this server serves version "
                           f"{MODEL_VERSION} only (or leave the version out).", 404, "not_found")


async def infer(inputs: list[Tensor], requested: list[str] | None, serving: Serving) -> list[Output]:
    """Run one inference request: its outputs, all of them or those ``requested``, in that order."""
    tensors = {t.name: t for t in inputs}
    if not inputs:
        raise RequestError("the request has no inputs: send at least one.")
    if len(tensors) != len(inputs):
        raise RequestError("an input name appears more than once: send each input once.")
    outputs = await INFER[serving.model.codec.accepts](tensors, serving)
    if not requested:
        return list(outputs.values())
    unknown = [n for n in requested if n not in outputs]
    if unknown:
        raise RequestError(f"unknown output(s) {unknown}; this model gives {', '.join(outputs)}.")
    return [outputs[n] for n in requested]


# What each codec accepts -> its metadata and inference: the one place v2 depends on the task.
SPECS: dict[str, Callable[[Any], ModelSpec]] = {TextCodec.accepts: _text_spec, DetectionCodec.accepts: _image_spec}
INFER: dict[str, Callable[[dict[str, Tensor], Serving], Awaitable[dict[str, Output]]]] = {
    TextCodec.accepts: _infer_texts, DetectionCodec.accepts: _infer_images,
}
