"""The Open Inference Protocol v2, transport-agnostic: typed tensors in, typed tensors out.

HTTP/JSON, HTTP with Triton's binary tensor data extension (``api_v2``) and gRPC (``grpc_v2``) all
decode their requests into ``Tensor``s and encode the same ``Output``s, so the three answer alike.
Every value is checked (datatype, shape, element count, integer range, UTF-8) before it reaches
numpy, the tokenizer or the model: a bad tensor is a 400 that names it, never a 500.

Which tensors a model takes and gives is its task family's (``ServeFamily.v2_spec`` and
``v2_infer``, in the family's ``serve.py``): text models take texts as a BYTES tensor ``text`` (or
their own INT64 token tensors) and give probabilities; detection models take the letterboxed FP32
``images`` tensor and give the raw outputs, as Triton serves them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekd.serving.context import Serving
from edgekd.serving.errors import RequestError
from edgekd.serving.model import ServedModel
from edgekd.serving.settings import ServeSettings

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


def integers(t: Tensor) -> np.ndarray:
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



# --- metadata -------------------------------------------------------------------------------------------
TensorSpec = tuple[str, str, list[int]]  # name, datatype, shape (-1: variable)


@dataclass
class ModelSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Any]
    # An output given only when the request sends a certain input -> that input (a text model's
    # ``truncated`` comes with ``text``, not with token tensors); every other output is always given.
    given_with: dict[str, str] = field(default_factory=dict)

    def outputs_for(self, inputs: Any) -> list[str]:
        """The names of the outputs a request sending ``inputs`` (names) gets, in the spec's order."""
        return [n for n, _, _ in self.outputs if n not in self.given_with or self.given_with[n] in inputs]


def model_spec(model: ServedModel) -> ModelSpec:
    spec = model.family.v2_spec(model.codec)
    spec.parameters = {"target": model.target, "labels": ",".join(model.codec.labels), **spec.parameters}
    return spec


def model_config(model: ServedModel, settings: ServeSettings) -> dict[str, Any]:
    """The model's configuration in Triton's JSON shape (``/v2/models/{name}/config``): the batch
    dimension is implied by ``max_batch_size``, so ``dims`` leave it out."""
    spec = model_spec(model)
    batch = model.family.max_batch(settings)

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
    if requested:  # checked before the model runs: a refused request costs no inference
        check_requested(requested, tensors, model_spec(serving.model))
    outputs = await serving.model.family.v2_infer(tensors, serving)
    if not requested:
        return list(outputs.values())
    missing = [n for n in requested if n not in outputs]
    if missing:  # the family's v2_spec said these inputs give them: the server's fault, not the client's
        raise RuntimeError(f"the model gave no output(s) {missing} for inputs {list(tensors)}, although its "
                           f"v2_spec lists them ({', '.join(outputs)} given).")
    return [outputs[n] for n in requested]


def check_requested(requested: list[str], inputs: dict[str, Tensor], spec: ModelSpec) -> None:
    """400 unless every requested output is one the model gives for these inputs."""
    given = spec.outputs_for(inputs)
    if all(n in given for n in requested):
        return
    known = {n for n, _, _ in spec.outputs}
    if unknown := [n for n in requested if n not in known]:
        raise RequestError(f"unknown output(s) {unknown}; this model gives {', '.join(given)}.")
    absent = [n for n in requested if n not in given]
    needs = ", ".join(f"'{n}' only with input '{spec.given_with[n]}'" for n in absent)
    raise RequestError(f"output(s) {absent} are not given for these inputs ({needs}); they give "
                       f"{', '.join(given)}.")

