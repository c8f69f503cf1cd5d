"""Object detection as the server sees it: ``POST /predict`` takes image files and answers labelled
boxes in original pixels; the Open Inference Protocol takes the letterboxed ``images`` tensor and
gives the raw outputs; ``edgekd.load(...).predict(images)`` answers as ``POST /predict`` does.
``SERVING`` hands them to the server (``edgekd.serving.family``). No torch here.

Images come as multipart/form-data parts ``file`` / ``files`` (what ``curl -F file=@x.jpg`` and
browsers send, no base64 overhead) or as JSON ``{"image": b64}`` / ``{"images": [b64, ...]}``.
Options (``conf_threshold``, ``iou_threshold``, ``max_det``) are query parameters, form fields or
JSON keys; one a request leaves out is the export's own (artifact.json's ``postprocess``, the recipe's
``detection.*`` values; 0.25, 0.6 and 100 for an export that records none). Decoding runs in a worker thread: a large JPEG takes tens of milliseconds to decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette import requests as starlette_requests
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekd.errors import ArgumentError, DataError
from edgekd.serving.batching import InferenceEngine
from edgekd.serving.context import Serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.family import ServeFamily
from edgekd.serving.http import MULTIPART, foreign_field, is_json, media_type, read_json, validate_body
from edgekd.serving.schemas import DetectionOut, DetectOptions, DetectRequest, DetectResponse, ImageDetections
from edgekd.serving.settings import ServeSettings
from edgekd.serving.v2_core import FLOAT_TYPES, ModelSpec, Output, Tensor
from edgekd.tasks.detection.codec import PAD_VALUE, Detection, DetectionCodec, Detections
from edgekd.tasks.detection.images import to_rgb, upright

FILE_FIELDS = ("file", "files")
OPTIONS = tuple(DetectOptions.model_fields)
HOW = ("send images as multipart/form-data parts named 'file' or 'files' (curl -F file=@photo.jpg) or as JSON "
       '{"image": "<base64>"} / {"images": ["<base64>", ...]}')
TEXTS_HERE = f"this model detects objects in images and takes no texts: {HOW}."
Blob = tuple[str, bytes, str | None]  # (where, bytes, declared content type)


def _multipart_available() -> bool:
    """Starlette parses forms only when it could import python-multipart (else it asserts: a 500)."""
    return starlette_requests.parse_options_header is not None


def _b64(text: str, where: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(f"{where} is a data: URL but not a base64 one: send data:image/png;base64,<data>.", 422)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where} is not valid base64 ({e}): send the image file's bytes base64-encoded "
                           "(standard alphabet, padded), optionally as a data:image/...;base64, URL.", 422) from None


async def _from_form(request: Request, settings: ServeSettings) -> tuple[list[Blob], dict[str, str]]:
    if not _multipart_available():
        raise RequestError("this server cannot read multipart forms (python-multipart is not installed): send JSON "
                           '{"image": "<base64>"} instead, or install edgekd[serve].', 415)
    try:
        form = await request.form()
    except StarletteHTTPException as e:
        raise RequestError(f"the multipart form could not be read ({e.detail}): {HOW}.", 400) from None
    try:
        blobs: list[Blob] = []
        options: dict[str, str] = {}
        n_files = 0
        for key, value in form.multi_items():
            if key in FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise RequestError(f"form field '{key}' is a text field, not a file: attach the image as a file "
                                       "part (curl -F file=@photo.jpg), or send base64 in JSON.", 422)
                n_files += 1
                if n_files <= settings.max_images:  # past the limit, only count
                    name = f" ({value.filename})" if value.filename else ""
                    blobs.append((f"files[{n_files - 1}]{name}", await value.read(), value.content_type))
            elif key in OPTIONS:
                if key in options:
                    raise RequestError(f"form field '{key}' is given more than once: give it once.", 422)
                options[key] = value if isinstance(value, str) else ""
            else:
                raise RequestError(f"unknown form field '{key}': {HOW}, with options {', '.join(OPTIONS)}.", 422)
        _check_count(n_files, settings)
        return blobs, options
    finally:
        await form.close()


def _from_json(data: Any, settings: ServeSettings) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(where, base64 text) per image, and the options; decoded only once the options are valid."""
    if isinstance(data, dict) and {"text", "texts"} & data.keys():
        raise RequestError(TEXTS_HERE, 422)
    if isinstance(data, dict) and (other := foreign_field(data, "image", "images")):
        raise RequestError(other, 422)
    body = validate_body(DetectRequest, data)
    texts = body.items()
    _check_count(len(texts), settings)
    where = ["image"] if body.image is not None else [f"images[{i}]" for i in range(len(texts))]
    return list(zip(where, texts, strict=True)), body.options()


def _check_count(n: int, settings: ServeSettings) -> None:
    if n == 0:
        raise RequestError(f"no image in the request: {HOW}.", 422)
    if n > settings.max_images:
        raise RequestError(f"{n} images in one request; this server takes at most {settings.max_images} "
                           "(max_images): split the request.", 422)


async def predict_images(request: Request, serving: Serving) -> DetectResponse:
    """Detect objects in the images of one /predict request (see the module docstring)."""
    settings, model = serving.settings, serving.model
    codec = model.codec
    assert isinstance(codec, DetectionCodec)
    media = media_type(request)
    query = {k: v for k in OPTIONS if (v := request.query_params.get(k)) is not None}
    blobs: list[Blob] = []
    encoded: list[tuple[str, str]] = []  # JSON: (where, base64), decoded once the options are valid
    if media == MULTIPART:
        blobs, given = await _from_form(request, settings)
    elif is_json(media):
        encoded, given = _from_json(await read_json(request), settings)
    else:
        raise RequestError(f"this model takes images: {HOW} (got Content-Type {media or 'none'}).", 415)
    twice = sorted(set(query) & set(given))
    if twice:
        raise RequestError(f"{', '.join(twice)} given both as a query parameter and in the body: give each once.", 422)
    options = validate_body(DetectOptions, {**codec.default_options, **query, **given}, loc="options")
    blobs += [(where, _b64(text, where), None) for where, text in encoded]
    items = await asyncio.to_thread(codec.encode, blobs)
    outputs = await within_deadline(serving.engine.infer(items), settings)
    serving.metrics.images.inc(len(items))
    found = codec.detections(outputs, items, conf_threshold=options.conf_threshold,
                             iou_threshold=options.iou_threshold, max_det=options.max_det)
    serving.metrics.detections.inc(sum(map(len, found)))
    return DetectResponse(
        model=model.name,
        target=model.target,
        predictions=[
            ImageDetections(width=it.width, height=it.height, detections=[
                DetectionOut(label=d.label, class_id=d.class_id, score=d.score, box=list(d.box),
                             **_category(d)) for d in dets
            ])
            for it, dets in zip(items, found, strict=True)
        ],
    )


def _category(d: Detection) -> dict[str, int]:
    """``category_id`` for the answer when the export records the dataset's ids (COCO data), else
    nothing: an unknown id is left out, never guessed from the class index. (It reaches the JSON once
    ``DetectionOut`` declares the field; /metadata's ``category_ids`` gives the same mapping.)"""
    return {} if d.category_id is None else {"category_id": d.category_id}


# --- Open Inference Protocol (v2) -------------------------------------------------------------------
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


async def v2_infer(tensors: dict[str, Tensor], serving: Serving) -> dict[str, Output]:
    codec = serving.model.codec
    assert isinstance(codec, DetectionCodec)
    arr = _image_array(tensors, codec, serving.settings)
    out = await within_deadline(serving.engine.run_arrays({codec.input_name: arr}), serving.settings)
    serving.metrics.images.inc(len(arr))
    return {name: Output(name, "FP32", np.asarray(out[name], dtype=np.float32)) for name in codec.outputs}


def v2_spec(codec: DetectionCodec) -> ModelSpec:
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


# --- edgekd.load(...).predict -------------------------------------------------------------------------
def predict_local(codec: DetectionCodec, engine: InferenceEngine, images: Any, batch_size: int,
                  options: dict[str, Any]) -> list[Detections]:
    """An image or a list of images (file paths, bytes, PIL images or HxWx3 RGB uint8 arrays) -> one
    ``Detections`` each (its list of Detection, and the image's width and height, as POST /predict answers
    them); ``options`` are POST /predict's (conf_threshold, iou_threshold, max_det), and one left out (or None)
    is the export's own, as for POST /predict. An invalid option is an ``ArgumentError`` naming it."""
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise TypeError(f"{', '.join(unknown)}: detection models take the options {', '.join(OPTIONS)}.")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        opts = DetectOptions(**{**codec.default_options, **given})
    except ValidationError as e:
        raise ArgumentError([f"{err['loc'][0]}: {err['msg']} (got {err['input']!r})" for err in e.errors()]) from None
    images = _image_list(images)
    if not images:
        raise DataError("no images to run: give an image or a list of images.")
    out: list[Detections] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        blobs = [(f"image {start + i}", _image_bytes(im, start + i), None) for i, im in enumerate(chunk)]
        items = codec.encode(blobs)
        outputs = engine.run_items(items)
        found = codec.detections(outputs, items, conf_threshold=opts.conf_threshold,
                                 iou_threshold=opts.iou_threshold, max_det=opts.max_det)
        out += [Detections(dets, it.width, it.height) for it, dets in zip(items, found, strict=True)]
    return out


def _image_list(images: Any) -> list[Any]:
    """What ``predict`` was given, as a list of images; a type that is neither an image nor a list of them is
    refused, saying what to pass (not Python's "not iterable", nor a mapping's keys taken for file paths)."""
    if isinstance(images, (bytearray, memoryview)):
        images = bytes(images)
    single = isinstance(images, (str, Path, bytes)) or hasattr(images, "size") and hasattr(images, "mode") \
        or getattr(images, "ndim", None) in (2, 3)
    if single:
        return [images]
    if isinstance(images, Mapping) or not isinstance(images, Iterable):
        raise DataError("predict takes an image (a file path, bytes, a PIL image or an H x W x 3 RGB uint8 array) "
                        f"or a list of images, not {type(images).__name__}.")
    return [bytes(im) if isinstance(im, (bytearray, memoryview)) else im for im in images]


def _image_bytes(image: Any, i: int) -> bytes:
    """An image as encoded bytes for the codec (which decodes, checks and letterboxes it)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image {i}: {path} does not exist.")
        return path.read_bytes()
    if getattr(image, "ndim", None) in (2, 3):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise DataError(f"image {i} is an array of shape {list(arr.shape)} and dtype {arr.dtype}: give "
                            "H x W x 3 RGB uint8.")
        image = Image.fromarray(arr, "RGB")
    if not isinstance(image, Image.Image):
        raise DataError(f"image {i} is {type(image).__name__}: give a file path, bytes, a PIL image or an "
                        "H x W x 3 RGB uint8 array.")
    # Made upright and 8-bit RGB here, as a file's bytes are decoded (detection.images): PNG keeps no
    # EXIF orientation of a photo opened from a JPEG, and cannot hold every mode Pillow opens (CMYK).
    buf = io.BytesIO()
    to_rgb(upright(image)).save(buf, format="PNG")
    return buf.getvalue()


# POST /predict's multipart form, and the options every body may carry as query parameters.
_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "One image file."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Several image files (repeat the part)."},
        **{name: {"type": "string", "description": f.description} for name, f in DetectOptions.model_fields.items()},
    },
}

SERVING = ServeFamily(
    task=DetectionCodec.task,
    accepts=DetectionCodec.accepts,
    codec=DetectionCodec.for_artifact,
    predict=predict_images,
    response_model=DetectResponse,
    request_models=(DetectRequest,),
    openapi_content={"application/json": {"schema": {"$ref": "#/components/schemas/DetectRequest"}},
                     MULTIPART: {"schema": _FORM_SCHEMA}},
    openapi_parameters=[
        {"name": name, "in": "query", "required": False,
         "description": f"Detection models only. {f.description}",
         "schema": {"type": "integer" if f.annotation is int else "number"}}
        for name, f in DetectOptions.model_fields.items()
    ],
    v2_spec=v2_spec,
    v2_infer=v2_infer,
    max_batch=lambda settings: settings.max_images,
    local_predict=predict_local,
)
