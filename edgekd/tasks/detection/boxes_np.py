"""Box geometry in numpy: letterboxing, IoU, NMS and the postprocess of raw detector outputs.

No torch here: the server letterboxes requests and runs NMS on an exported model's raw outputs
with these functions, and the evaluation uses the same code, so served and measured boxes agree.
Boxes are ``xyxy`` in pixels throughout.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgekd.errors import DataError


def letterbox(image: np.ndarray, size: int, fill: int = 114) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize ``image`` (HWC uint8 RGB) to fit ``size`` x ``size`` keeping its aspect ratio, centred
    on a ``fill`` border (114: the grey Ultralytics pads with, so pretrained YOLO weights see what
    they were trained on).

    Returns (letterboxed image, scale, (pad_x, pad_y)): a point ``p`` of the original image lies at
    ``p * scale + pad`` in the letterboxed one; ``unletterbox_boxes`` undoes it.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(
            f"letterbox expects a non-empty HWC image with 1, 3 or 4 channels, got shape {image.shape}; "
            "decode images to RGB (PIL: Image.open(path).convert('RGB')) first."
        )
    if image.dtype != np.uint8:
        raise DataError(f"letterbox expects uint8 pixels (0..255), got {image.dtype}; convert with .astype(np.uint8).")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    h, w = image.shape[:2]
    scale = min(size / w, size / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out = np.full((size, size, 3), fill, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = image
    return out, float(scale), (float(left), float(top))


def unletterbox_boxes(
    boxes: np.ndarray, scale: float, pad: tuple[float, float], orig_w: int, orig_h: int
) -> np.ndarray:
    """Map ``xyxy`` boxes from letterboxed pixels back to the original image, clipped to it."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = (boxes - np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float32)) / np.float32(scale)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, orig_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, orig_h)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``xyxy`` boxes: [n,4] x [m,4] -> [n,m]. Empty boxes have IoU 0 with everything."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: keep the best remaining box, drop those overlapping it with IoU > ``iou_threshold``.

    Returns int64 indices of the kept boxes, highest score first (ties: lower index first, so the
    result does not depend on the sort implementation).
    """
    return _nms(boxes, scores, iou_threshold, None)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None) -> np.ndarray:
    """``nms`` stopping after ``limit`` kept boxes: greedy NMS keeps boxes in order, so the first
    ``limit`` are the same, and an untrained model's thousands of candidates cost ``limit`` passes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise DataError(f"nms got {len(boxes)} boxes but {len(scores)} scores; pass one score per box.")
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[box_iou(boxes[i : i + 1], boxes[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each class only: boxes of different classes never suppress each other.

    Each class is shifted by its own offset larger than the span of all coordinates, so boxes of
    different classes cannot overlap and one NMS pass does the work of one per class.
    """
    return _batched_nms(boxes, scores, classes, iou_threshold, None)


def _batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, limit: int | None
) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    if len(classes) != len(boxes):
        raise DataError(f"batched_nms got {len(boxes)} boxes but {len(classes)} classes; pass one class per box.")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(boxes.max() - boxes.min()) + 1.0
    _, cls_idx = np.unique(classes, return_inverse=True)
    shifted = boxes + (cls_idx.reshape(-1).astype(np.float64) * span)[:, None]
    return _nms(shifted, scores, iou_threshold, limit)


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.6,
    max_det: int = 100,
) -> list[np.ndarray]:
    """Raw detector outputs -> detections per image, as YOLOv8's export postprocess does.

    ``boxes`` [B,N,4] xyxy and ``scores`` [B,N,C] (probabilities) -> per image a float32 [k,6] array
    of rows (x1, y1, x2, y2, score, class), best score first. Each location proposes only its best
    class (no multi-label candidates, unlike Ultralytics validation with multi_label=True), kept when
    its score is above ``conf_threshold``; then class-aware NMS and the ``max_det`` best.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise DataError(
            f"postprocess expects boxes [B,N,4] and scores [B,N,C] with the same B and N, got boxes "
            f"{boxes.shape} and scores {scores.shape}; pass the model's raw 'boxes' and 'scores' outputs."
        )
    out = []
    for b, s in zip(boxes, scores, strict=True):
        cls = s.argmax(-1) if s.shape[-1] else np.zeros(len(s), dtype=np.int64)
        conf = s.max(-1) if s.shape[-1] else np.zeros(len(s), dtype=np.float32)
        cand = np.flatnonzero(conf > conf_threshold)
        if cand.size > 30_000:  # cap the NMS work on degenerate (all-confident) outputs, as Ultralytics does
            cand = cand[np.argsort(-conf[cand], kind="stable")[:30_000]]
        keep = cand[_batched_nms(b[cand], conf[cand], cls[cand], iou_threshold, max_det)]
        det = np.concatenate([b[keep], conf[keep, None], cls[keep, None].astype(np.float32)], axis=1)
        out.append(det.astype(np.float32).reshape(-1, 6))
    return out
