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
from collections import Counter
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
# The values each integer datatype holds: a value sent as JSON (or gRPC ``int_contents``, which is int32
# for INT8 and INT16 alike) must lie in its declared datatype's range.
INT_RANGES = {t: (int(np.iinfo(NUMPY_TYPES[t]).min), int(np.iinfo(NUMPY_TYPES[t]).max)) for t in INT_TYPES}
# The protocol extensions this server implements, reported by server metadata over HTTP and gRPC alike.
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration"]
# The output parameter of Triton's classification extension (tritonclient's ``class_count``).
CLASSIFICATION = "classification"
# The tensor parameters of Triton's shared-memory extensions (tritonclient's ``set_shared_memory`` on an
# input or a requested output), which this server does not implement: a tensor carrying one is refused.
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


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
    """The tensor's values as int64, refusing anything that is not a whole number within its declared
    datatype's range and int64's."""
    if isinstance(t.data, np.ndarray):
        if t.data.dtype.kind not in "iu":
            raise RequestError(f"input '{t.name}' must be an integer tensor (INT64), got {t.datatype}.")
        if t.data.dtype.kind == "u" and t.data.size and int(t.data.max()) > INT64_MAX:
            raise RequestError(f"input '{t.name}' holds values over {INT64_MAX} (int64's range).")
        return t.data.astype(np.int64).reshape(t.shape)
    if not all(type(v) is int for v in t.data):
        raise RequestError(f"input '{t.name}' holds non-integer values: send whole numbers.")
    # Checked against the declared datatype, not only int64: an INT8 tensor holding 300 is not INT8.
    kind = t.datatype if t.datatype in INT_RANGES else "INT64"
    low, high = INT_RANGES[kind]
    if t.data and (min(t.data) < low or max(t.data) > high):
        wider = "" if kind in ("INT64", "UINT64") else ", or declare a wider datatype (INT64)"
        its = f" (its datatype {t.datatype})" if kind == t.datatype else ""
        raise RequestError(f"input '{t.name}' holds values outside {kind.lower()}'s range [{low}, {high}]{its}: "
                           f"send values within it{wider}.")
    if t.data and max(t.data) > INT64_MAX:  # UINT64 values the int64 model inputs cannot hold
        raise RequestError(f"input '{t.name}' holds values over {INT64_MAX} (int64's range).")
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
    # Inputs a request may leave out (a text model takes ``text`` or its token tensors): Triton's
    # ``optional`` in the model configuration. Every other input is required.
    optional: frozenset[str] = frozenset()
    # Outputs holding one score per class (the codec's labels) on their last axis: the ones Triton's
    # classification extension may rank. A model with none (a detector) refuses the extension.
    class_outputs: tuple[str, ...] = ()

    def outputs_for(self, inputs: Any) -> list[str]:
        """The names of the outputs a request sending ``inputs`` (names) gets, in the spec's order."""
        return [n for n, _, _ in self.outputs if n not in self.given_with or self.given_with[n] in inputs]


def model_spec(model: ServedModel) -> ModelSpec:
    spec = model.family.v2_spec(model.codec)
    spec.parameters = {"target": model.target, "labels": ",".join(model.codec.labels), **spec.parameters}
    return spec


def model_config(model: ServedModel, settings: ServeSettings) -> dict[str, Any]:
    """The model's configuration in Triton's JSON shape (``/v2/models/{name}/config``, gRPC ModelConfig):
    the batch dimension is implied by ``max_batch_size``, so ``dims`` leave it out; a tensor that is
    only [batch] has ``dims`` [1] and ``reshape`` to [] (Triton's way of saying: [batch], not
    [batch, 1]); an input the model can do without is ``optional``."""
    spec = model_spec(model)
    batch = model.family.max_batch(settings)

    def triton(t: TensorSpec) -> dict[str, Any]:
        name, datatype, shape = t
        entry: dict[str, Any] = {"name": name, "data_type": "TYPE_STRING" if datatype == "BYTES" else
                                 f"TYPE_{datatype}", "dims": shape[1:] or [1]}
        if not shape[1:]:
            entry["reshape"] = {"shape": []}
        return entry

    inputs = [{**triton(t), **({"optional": True} if t[0] in spec.optional else {})} for t in spec.inputs]
    return {"name": model.name, "platform": model.platform, "backend": "edgekd", "max_batch_size": batch,
            "input": inputs, "output": [triton(t) for t in spec.outputs],
            "parameters": {k: {"string_value": str(v)} for k, v in spec.parameters.items()}}


# --- dispatch -------------------------------------------------------------------------------------------
def check_model(serving: Serving, name: str, version: str | None = None) -> None:
    """404 unless ``name`` (and ``version``, when given) is what this server serves."""
    if name != serving.model.name:
        raise RequestError(f"unknown model '{name}': this server serves '{serving.model.name}'.", 404, "not_found")
    if version not in (None, "", MODEL_VERSION):
        raise RequestError(f"model '{name}' has no version '{version}': this server serves version "
                           f"{MODEL_VERSION} only (or leave the version out).", 404, "not_found")


def refuse_shared_memory(inputs: list[tuple[str, dict[str, Any] | None]],
                         outputs: list[tuple[str, dict[str, Any] | None]]) -> None:
    """400 for an input or output (name, parameters) that carries Triton's shared-memory parameters: this
    server implements neither shared-memory extension, and an output answered in the body while the
    client reads its region would be a silently wrong result."""
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for name, params in tensors:
            if found := [p for p in SHARED_MEMORY if p in (params or {})]:
                fix = ("ask for the output in the response body instead (leave out set_shared_memory; "
                       "binary_data for its raw bytes)" if kind == "output" else
                       "send its data in the request instead (leave out set_shared_memory; 'data', binary_data "
                       "or gRPC raw_input_contents)")
                raise RequestError(f"{kind} '{name}' has parameter{'s' if len(found) > 1 else ''} {', '.join(found)}, "
                                   "but this server does not implement Triton's shared-memory extensions (its "
                                   f"extensions: {', '.join(EXTENSIONS)}): {fix}.")


def class_count(output: str, params: dict[str, Any] | None) -> int | None:
    """The K of Triton's classification extension asked for ``output`` (its ``classification``
    parameter), None when not asked; 400 for a K that is not a whole number >= 1."""
    params = params or {}
    if "class_count" in params:  # tritonclient's argument name, sent by hand as a parameter
        raise RequestError(f"output '{output}': the classification extension's parameter is "
                           f"'{CLASSIFICATION}' (tritonclient's InferRequestedOutput(name, class_count=K) sends it), "
                           "not 'class_count'.")
    k = params.get(CLASSIFICATION)
    if k is None:
        return None
    if type(k) is not int or k < 1:
        raise RequestError(f"output '{output}': {CLASSIFICATION} must be a whole number >= 1, the number of top "
                           f"classes to return (got {k!r}).")
    return k


async def infer(inputs: list[Tensor], requested: list[str] | None, serving: Serving,
                classes: dict[str, int] | None = None) -> list[Output]:
    """Run one inference request: its outputs, all of them or those ``requested``, in that order;
    an output named in ``classes`` comes as its top K classes (Triton's classification extension)."""
    tensors = {t.name: t for t in inputs}
    if not inputs:
        raise RequestError("the request has no inputs: send at least one.")
    if len(tensors) != len(inputs):
        raise RequestError("an input name appears more than once: send each input once.")
    if requested and len(set(requested)) != len(requested):
        twice = sorted(n for n, times in Counter(requested).items() if times > 1)
        raise RequestError(f"output(s) {twice} are requested more than once: request each output once.")
    classes = classes or {}
    spec = model_spec(serving.model)
    if requested:  # checked before the model runs: a refused request costs no inference
        check_requested(requested, tensors, spec)
    check_classes(classes, spec)
    outputs = await serving.model.family.v2_infer(tensors, serving)
    if not requested:
        return list(outputs.values())
    missing = [n for n in requested if n not in outputs]
    if missing:  # the family's v2_spec said these inputs give them: the server's fault, not the client's
        raise RuntimeError(f"the model gave no output(s) {missing} for inputs {list(tensors)}, although its "
                           f"v2_spec lists them ({', '.join(outputs)} given).")
    labels = serving.model.codec.labels
    return [top_classes(outputs[n], classes[n], labels) if n in classes else outputs[n] for n in requested]


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


def check_classes(classes: dict[str, int], spec: ModelSpec) -> None:
    """400 unless every output asked for as classification holds one score per class."""
    refused = [n for n in classes if n not in spec.class_outputs]
    if not refused:
        return
    which = (f"only {', '.join(spec.class_outputs)} (one score per class) can" if spec.class_outputs else
             "this model has no output of one score per class to rank: ask for its outputs without it")
    raise RequestError(f"output(s) {refused} cannot be returned as classification (Triton's classification "
                       f"extension): {which}.")


def top_classes(out: Output, k: int, labels: list[str]) -> Output:
    """Triton's classification of ``out`` (one score per class on its last axis): a BYTES tensor
    [batch, min(k, classes)] of "<score>:<index>:<label>", highest score first (ties: lower index first),
    the score printed as Triton prints it (C's ``%f`` for floats)."""
    lead, n = out.values.shape[:-1], out.values.shape[-1]
    scores = out.values.reshape(-1, n)
    k = min(k, n)
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :k]
    as_text = (lambda v: f"{float(v):f}") if scores.dtype.kind == "f" else (lambda v: str(int(v)))
    rows = [[f"{as_text(row[i])}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in top]
            for row, top in zip(scores, order.tolist(), strict=True)]
    return Output(out.name, "BYTES", np.asarray(rows, dtype=object).reshape(*lead, k))
