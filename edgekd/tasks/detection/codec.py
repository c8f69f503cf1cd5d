"""Images in, letterboxed float tensors out; raw detector outputs in, boxes in original pixels out.

Decoding is hardened for untrusted uploads: only common raster formats are parsed (Pillow knows
dozens, some of which shell out or have a history of parser bugs), the pixel count is checked from
the header before any pixel is decoded (a 100 KB PNG can expand to gigabytes), and the file is
``verify()``-ed then fully loaded so that truncated or corrupt files are refused, not half-read.
EXIF orientation is applied, so boxes refer to the image as a viewer shows it.

Letterboxing and NMS are ``edgekd.tasks.detection.boxes_np``'s, the code the evaluation uses, so
served boxes are the boxes that were measured. No torch here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from edgekd.errors import StageError
from edgekd.export.base import ARTIFACT_META
from edgekd.serving.codec import label_names
from edgekd.serving.errors import RequestError
from edgekd.serving.schemas import DetectOptions
from edgekd.tasks.detection.boxes_np import letterbox, postprocess, unletterbox_boxes
from edgekd.tasks.detection.images import rgb_pixels

if TYPE_CHECKING:
    from edgekd.export.base import Runner
    from edgekd.serving.settings import ServeSettings

log = logging.getLogger("edgekd.serving")

# Pillow plugins tried on uploads (the JPEG one also opens the MPO files many phone cameras write).
# init() registers every plugin: Image.open(formats=...) only finds the ones already registered.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "GIF", "TIFF") if f in Image.OPEN)
PAD_VALUE = 114  # letterbox border, as the detectors were trained with
RAW_OUTPUTS = ("boxes", "scores")
NMS_OUTPUT = "detections"  # [B,K,6] from an NMS-in-graph export: no host-side NMS


@dataclass(frozen=True)
class ImageItem:
    """One decoded image, letterboxed to the model's input, and how to map boxes back to it."""

    pixels: np.ndarray  # [S, S, 3] uint8 RGB: 4x smaller than float32 while it waits for a batch
    width: int
    height: int
    scale: float
    pad: tuple[float, float]


@dataclass(frozen=True)
class Detection:
    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels
    # The dataset's id of the class (COCO category_id, e.g. 1..90 with gaps), from the export's
    # ``category_ids``; None when the model's data named none (YOLO: class_id is all there is).
    category_id: int | None = None


class Detections(list):
    """One image's answer to ``edgekd.load(...).predict``: the list of its :class:`Detection` objects, with the
    image's ``width`` and ``height`` in pixels (as it is shown: EXIF orientation applied), the names of
    ``POST /predict``'s answer for the image (``detections`` is the list itself)."""

    def __init__(self, detections: Sequence[Detection], width: int, height: int):
        super().__init__(detections)
        self.width, self.height = int(width), int(height)

    @property
    def detections(self) -> list[Detection]:
        return list(self)

    def __repr__(self) -> str:
        return f"Detections({list.__repr__(self)}, width={self.width}, height={self.height})"


def decode_image(data: bytes, where: str, max_pixels: int, declared: str | None = None) -> np.ndarray:
    """``data`` (an encoded image file) as an HWC uint8 RGB array, EXIF orientation applied.

    Every refusal is a ``RequestError`` naming ``where`` (e.g. ``files[1] (cat.jpg)``): empty,
    not an image (``declared`` is the client's content type, quoted when it is not an image type),
    over ``max_pixels``, truncated or corrupt.
    """
    if not data:
        raise RequestError(f"{where} is empty (0 bytes): send the image file's bytes.", 422)
    sent_as = f", sent as {declared}" if declared and not declared.startswith(("image/", "application/octet")) else ""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            _check_pixels(probe.size, where, max_pixels)
            probe.verify()  # structure and checksums (PNG CRCs) without decoding
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im.load()  # decodes every pixel: a truncated file fails here
            return rgb_pixels(im)  # upright, 8-bit RGB: as the training data was read (detection.images)
    except RequestError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own process-wide limit, found while opening
        raise RequestError(f"{where} is too large to decode ({e}); this server takes at most {max_pixels} pixels "
                           "(max_image_pixels): downscale the image before sending it.", 413, "too_large") from None
    except UnidentifiedImageError:
        raise RequestError(f"{where} is not an image this server reads ({', '.join(IMAGE_FORMATS)}{sent_as}): "
                           "send a JPEG, PNG or WebP file.", 422) from None
    except Exception as e:  # Pillow reports corrupt data with many types (OSError, SyntaxError, ValueError...)
        log.debug("%s could not be decoded", where, exc_info=True)
        raise RequestError(f"{where} could not be decoded ({type(e).__name__}: {e}); the file is truncated or "
                           "corrupt: send the complete image file.", 422) from None


def _check_pixels(size: tuple[int, int], where: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise RequestError(f"{where} has no pixels ({w}x{h}): send a non-empty image.", 422)
    if w * h > max_pixels:
        raise RequestError(f"{where} is {w}x{h} = {w * h} pixels; this server takes at most {max_pixels} "
                           "(max_image_pixels): downscale the image before sending it.", 413, "too_large")


def _recorded_postprocess(folder: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """artifact.json's ``postprocess`` (None when the export records none), checked as a request's
    options are: a value no request could give is refused at load, not at every request."""
    recorded = meta.get("postprocess")
    if recorded is None:
        return None
    try:
        return DetectOptions.model_validate(recorded).model_dump()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'postprocess'}: {err['msg']}" for err in e.errors())
        raise StageError(f"{folder / ARTIFACT_META} records postprocess {recorded!r}, which is not valid "
                         f"({problems}); it gives conf_threshold, iou_threshold and max_det: re-export it.") from None


def _recorded_category_ids(folder: Path, meta: dict[str, Any], labels: Sequence[str]) -> list[int] | None:
    """artifact.json's ``category_ids`` (the dataset's id of each class, in class-id order); None when
    the export records none. One that cannot map the classes is refused at load, not guessed around."""
    ids = meta.get("category_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) \
            or (labels and len(ids) != len(labels)):
        raise StageError(f"{folder / ARTIFACT_META} records category_ids {ids!r}, which is not one integer per "
                         f"label ({len(labels)} labels): re-export it.")
    return list(ids)


def _px(v: float) -> float:
    """A coordinate for JSON: a thousandth of a pixel is below any use, and float32 noise is not."""
    return round(float(v), 3)


class DetectionCodec:
    """Images into the runner's ``images`` tensor, raw outputs into detections per image."""

    task: ClassVar[str] = "detection"
    accepts: ClassVar[str] = "images"

    def __init__(self, *, image_size: int, labels: Sequence[str], input_name: str, output_names: Sequence[str],
                 max_image_pixels: int, default_options: dict[str, Any] | None = None,
                 category_ids: Sequence[int] | None = None):
        self.image_size = int(image_size)
        self.category_ids = None if category_ids is None else [int(i) for i in category_ids]
        # The options a request leaves out: the export's recorded post-processing (artifact.json's
        # ``postprocess``: the recipe's detection.conf_threshold, iou_threshold, max_det), else
        # DetectOptions' own defaults (an export written before it was recorded).
        self.default_options: dict[str, Any] = DetectOptions(**(default_options or {})).model_dump()
        self.labels = list(labels)
        self.input_name = input_name
        self.input_names = (input_name,)
        self.nms_in_graph = NMS_OUTPUT in output_names and not set(RAW_OUTPUTS) <= set(output_names)
        if not self.nms_in_graph and not set(RAW_OUTPUTS) <= set(output_names):
            raise StageError(f"the artifact gives outputs {list(output_names)}; a detection model gives 'boxes' "
                             "[B,N,4] and 'scores' [B,N,C], or 'detections' [B,K,6] (NMS in the graph): re-export it.")
        self.outputs: tuple[str, ...] = (NMS_OUTPUT,) if self.nms_in_graph else RAW_OUTPUTS
        self.max_image_pixels = max_image_pixels
        self.output_shapes: dict[str, list[int]] = {}  # per image, from the warm-up call

    @classmethod
    def for_artifact(cls, folder: Path, meta: dict[str, Any], runner: Runner,
                     settings: ServeSettings) -> DetectionCodec:
        from edgekd.serving.settings import refuse_unread

        refuse_unread(settings, ("max_items", "max_text_chars", "max_length", "overflow"),
                      f"only a text export reads it, and {folder} is a detection export")
        size = meta.get("image_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise StageError(f"{folder / ARTIFACT_META} records no valid image_size (got {size!r}); a detection "
                             "export records the square input size it was exported for: re-export it.")
        if len(runner.input_names) != 1:
            raise StageError(f"the artifact takes inputs {list(runner.input_names)}; a detection model takes one "
                             "'images' tensor [B,3,S,S]: re-export it.")
        labels = label_names(meta)
        codec = cls(image_size=size, labels=labels, input_name=runner.input_names[0],
                    output_names=list(runner.output_names), max_image_pixels=settings.max_image_pixels,
                    default_options=_recorded_postprocess(folder, meta),
                    category_ids=_recorded_category_ids(folder, meta, labels))
        codec.warm_up(runner)
        return codec

    def warm_up(self, runner: Runner) -> None:
        """One grey image through the runner: outputs must fit the detection contract before serving."""
        s = self.image_size
        blank = ImageItem(np.full((s, s, 3), PAD_VALUE, np.uint8), s, s, 1.0, (0.0, 0.0))
        out = runner.run(self.pad([blank]))
        missing = [n for n in self.outputs if n not in out]
        if missing:
            raise StageError(f"the model returned {sorted(out)}, not {missing}: the artifact and its io do not match.")
        shapes = {n: list(np.asarray(out[n]).shape) for n in self.outputs}
        if self.nms_in_graph:
            ok = len(shapes[NMS_OUTPUT]) == 3 and shapes[NMS_OUTPUT][::2] == [1, 6]
        else:
            b, sc = shapes["boxes"], shapes["scores"]
            ok = len(b) == 3 and len(sc) == 3 and b[2] == 4 and b[:2] == sc[:2] == [1, b[1]]
            if ok and self.category_ids is not None and sc[2] != len(self.category_ids):
                raise StageError(f"the model scores {sc[2]} classes but {ARTIFACT_META} records "
                                 f"{len(self.category_ids)} category_ids: the artifact and its metadata do not "
                                 "match; re-export it.")
            if ok and self.labels and sc[2] != len(self.labels):
                raise StageError(f"the model scores {sc[2]} classes but {ARTIFACT_META} lists {len(self.labels)} "
                                 "labels: the artifact and its metadata do not match; re-export it.")
            if ok and not self.labels:
                self.labels = [f"class_{i}" for i in range(sc[2])]
        if not ok:
            raise StageError(f"the model returned shapes {shapes} for one image; a detector returns boxes [B,N,4] "
                             "and scores [B,N,C], or detections [B,K,6]: re-export it.")
        self.output_shapes = {n: shape[1:] for n, shape in shapes.items()}

    def select_outputs(self, output_names: Sequence[str]) -> tuple[str, ...]:
        return self.outputs

    def facts(self) -> dict[str, Any]:
        facts = {"task": self.task, "inputs": self.accepts, "image_size": self.image_size,
                 "nms_in_graph": self.nms_in_graph}
        if self.category_ids is not None:  # class_id -> the dataset's category id (COCO data only)
            facts["category_ids"] = list(self.category_ids)
        return facts

    # --- images -> arrays --------------------------------------------------------------------------
    def encode(self, blobs: Sequence[tuple[str, bytes, str | None]]) -> list[ImageItem]:
        """Decode and letterbox ``(where, bytes, declared content type)`` uploads, one at a time so that
        at most one full-size image is in memory. Blocking: call it in a worker thread."""
        items = []
        for where, data, declared in blobs:
            rgb = decode_image(data, where, self.max_image_pixels, declared)
            h, w = rgb.shape[:2]
            boxed, scale, pad = letterbox(rgb, self.image_size, fill=PAD_VALUE)
            del rgb
            items.append(ImageItem(boxed, w, h, scale, pad))
        return items

    def pad(self, items: Sequence[ImageItem]) -> dict[str, np.ndarray]:
        """[B,3,S,S] float32 RGB in 0..1: every item already has the model's square shape."""
        batch = np.stack([it.pixels for it in items]).transpose(0, 3, 1, 2)
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32) / np.float32(255.0)}

    # --- outputs -> detections ---------------------------------------------------------------------
    def detections(self, outputs: dict[str, np.ndarray], items: Sequence[ImageItem], *, conf_threshold: float,
                   iou_threshold: float, max_det: int) -> list[list[Detection]]:
        """Per image, detections best first, boxes in original pixels. With NMS in the graph the
        graph's own IoU threshold applies and ``iou_threshold`` is not used."""
        if self.nms_in_graph:
            rows = []
            for det in np.asarray(outputs[NMS_OUTPUT], dtype=np.float32):
                det = det[det[:, 4] > conf_threshold]
                rows.append(det[np.argsort(-det[:, 4], kind="stable")][:max_det])
        else:
            rows = postprocess(outputs["boxes"], outputs["scores"], conf_threshold, iou_threshold, max_det)
        out = []
        for det, it in zip(rows, items, strict=True):
            boxes = unletterbox_boxes(det[:, :4], it.scale, it.pad, it.width, it.height)
            out.append([
                Detection(label=self.label(int(c)), class_id=int(c), score=float(s),
                          box=(_px(x1), _px(y1), _px(x2), _px(y2)), category_id=self.category_id(int(c)))
                for (x1, y1, x2, y2), s, c in zip(boxes, det[:, 4], det[:, 5], strict=True)
            ])
        return out

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"

    def category_id(self, class_id: int) -> int | None:
        """The dataset's category id of class ``class_id``; None when the export records none."""
        ids = self.category_ids
        return ids[class_id] if ids is not None and 0 <= class_id < len(ids) else None
