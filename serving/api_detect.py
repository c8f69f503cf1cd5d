"""POST /predict for detection models: image files in, labelled boxes in original pixels out.

Images come as multipart/form-data parts ``file`` / ``files`` (what ``curl -F file=@x.jpg`` and
browsers send, no base64 overhead) or as JSON ``{"image": b64}`` / ``{"images": [b64, ...]}``.
Options (``conf_threshold``, ``iou_threshold``, ``max_det``) are query parameters, form fields or
JSON keys. Decoding runs in a worker thread: a large JPEG takes tens of milliseconds to decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from fastapi import Request
from starlette import requests as starlette_requests
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekd.serving.context import Serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.http import MULTIPART, foreign_field, is_json, media_type, read_json, validate_body
from edgekd.serving.schemas import DetectionOut, DetectOptions, DetectRequest, DetectResponse, ImageDetections
from edgekd.serving.settings import ServeSettings
from edgekd.serving.vision import DetectionCodec

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
    options = validate_body(DetectOptions, {**query, **given}, loc="options")
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
                DetectionOut(label=d.label, class_id=d.class_id, score=d.score, box=list(d.box)) for d in dets
            ])
            for it, dets in zip(items, found, strict=True)
        ],
    )
