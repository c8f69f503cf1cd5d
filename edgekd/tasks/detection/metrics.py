"""Detection metrics: COCO mAP (by pycocotools itself, so figures compare with published ones) and
box agreement between two models' outputs (parity of an exported artifact with its source)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from edgekd.errors import DataError, MissingBackendError
from edgekd.tasks.detection.boxes_np import box_iou, postprocess


def coco_map(
    predictions: list[np.ndarray],
    ground_truth: list[np.ndarray] | np.ndarray,
    num_classes: int,
    *,
    max_det: int = 100,
) -> dict[str, float]:
    """``map50_95`` (COCO's AP over IoU 0.50:0.95) and ``map50`` over all images, area range "all".

    ``predictions``: per image [k,6] rows (x1, y1, x2, y2, score, class); ``ground_truth``: per image
    [m,5] rows (class, x1, y1, x2, y2), in the same pixels, or [m,6] whose 6th column is COCO's iscrowd
    (a crowd region: a detection on it is ignored, neither hit nor false positive, as pycocotools scores
    the original json; ``DetectionSplit.ground_truth`` gives those for COCO sets). As in COCO, a class without ground truth
    is left out of the mean (its false positives cost nothing), and at most ``max_det`` detections
    per image are scored. No predictions at all score 0.0.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise MissingBackendError("COCO mAP", "pycocotools", "detect", str(e)) from None
    if len(predictions) != len(ground_truth):
        raise DataError(
            f"coco_map got predictions for {len(predictions)} images but ground truth for {len(ground_truth)}; "
            "pass one entry per image, in the same order."
        )
    images, annotations = [], []
    for i, gt in enumerate(ground_truth):
        images.append({"id": i + 1})
        gt = np.asarray(gt, dtype=np.float64)
        gt = gt.reshape(-1, 6) if gt.ndim == 2 and gt.shape[1] == 6 else np.pad(gt.reshape(-1, 5), ((0, 0), (0, 1)))
        for cls, x1, y1, x2, y2, crowd in gt.tolist():
            w, h = x2 - x1, y2 - y1
            annotations.append(  # ids from 1: COCOeval treats a matched gt id of 0 as "unmatched"
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd != 0)}
            )
    if not any(a["iscrowd"] == 0 for a in annotations):
        raise DataError(
            f"No ground-truth boxes in {len(images)} image(s), so mAP is undefined; check that the labels were "
            "found (YOLO: labels/ beside images/; COCO: 'annotations' in the json)."
        )
    results = [
        {"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
        for i, det in enumerate(predictions)
        for x1, y1, x2, y2, s, c in np.asarray(det, dtype=np.float64).reshape(-1, 6).tolist()
    ]
    if not results:
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        gt_coco = COCO()
        gt_coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        gt_coco.createIndex()
        evaluator = COCOeval(gt_coco, gt_coco.loadRes(results), "bbox")
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision [iou thresholds, recall points, classes, area ranges, max dets]; -1 = class without gt.
    # Read directly instead of summarize(), which prints and assumes maxDets == 100.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    at50 = precision[np.isclose(evaluator.params.iouThrs, 0.5)]
    return {"map50_95": _mean_valid(precision), "map50": _mean_valid(at50)}


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else 0.0


def detection_metrics(
    outputs: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_det: int = 100,
) -> dict[str, float]:
    """mAP from raw model outputs (``boxes`` [B,N,4], ``scores`` [B,N,C]) and ``labels`` (one [m,5]
    array per image, see ``DetectionSplit.ground_truth``). The low default confidence threshold is
    the one mAP is conventionally measured at: it keeps the tail of the precision-recall curve."""
    dets, num_classes = detections_of(outputs, "outputs", conf_threshold, iou_threshold, max_det)
    labels = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if len(labels) != len(dets):
        raise DataError(f"detection_metrics got outputs for {len(dets)} images but labels for {len(labels)}.")
    if num_classes is None:  # NMS in the graph: the classes are the labels'
        num_classes = 1 + max([int(g[:, 0].max()) for g in labels if len(g)] + [0])
    return coco_map(dets, list(labels), num_classes=num_classes, max_det=max_det)


def detections_of(outputs: dict[str, np.ndarray], what: str, conf_threshold: float, iou_threshold: float,
                  max_det: int = 100) -> tuple[list[np.ndarray], int | None]:
    """Per image [k,6] rows (x1,y1,x2,y2,score,class) from raw outputs (host NMS) or from an
    NMS-in-graph ``detections`` output (rows over ``conf_threshold``; padding has score 0); and the
    number of classes when the outputs tell it."""
    if "detections" in outputs:
        det = np.asarray(outputs["detections"], dtype=np.float32)
        rows = [d[d[:, 4] > conf_threshold][:max_det] for d in det]
        return [r[np.argsort(-r[:, 4], kind="stable")] for r in rows], None
    boxes, scores = _raw(outputs, what)
    return postprocess(boxes, scores, conf_threshold=conf_threshold, iou_threshold=iou_threshold,
                       max_det=max_det), scores.shape[-1]


# At least this many locations (raw outputs) or detections (NMS output) of every image are compared: where
# fewer score conf_threshold, the source's best-scoring ones are compared as well. A detector that finds
# nothing at the threshold (an untrained one, a hard image) is still checked on what it scores highest.
MIN_COMPARED = 10


def box_agreement(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.6,
    match_iou: float = 0.9,
    score_tolerance: float = 0.1,
    max_det: int = 100,
    min_compared: int = MIN_COMPARED,
) -> float:
    """How far two models' outputs on the same images give the same detections (export parity).

    Raw outputs (``boxes``/``scores``, the same locations on both sides) are compared location by
    location: over every location where either side scores at least ``conf_threshold`` and, in an image
    where the source (``want``) has fewer than ``min_compared`` such locations, its ``min_compared``
    best-scoring ones (of those it scores above 0), the share where both pick the same class, with best scores within
    ``score_tolerance`` and boxes of IoU >= ``match_iou``. Comparing before NMS keeps the figure stable: a
    score a hair either side of the threshold, or two near-equal boxes that NMS keeps in a different order,
    are not disagreements. An NMS-in-graph ``detections`` output is compared after NMS: detections matched
    one to one (same class, IoU >= ``match_iou``), at most ``max_det`` per image, 2 * matched / (detections
    of both), over those scoring above ``conf_threshold`` or, in an image where the source has fewer, above
    the score of its ``min_compared``-th best detection. 1.0 only when there is nothing to compare at all
    (every score 0, every NMS row padding). The export stage passes the recipe's ``detection.conf_threshold``,
    ``iou_threshold`` and ``max_det`` (``DetectionTask.agreement``); the element-wise difference gate
    (``edgekd.export.parity.ParityGate``) checks the raw scores and boxes beside it."""
    if "detections" not in got and "detections" not in want:
        gb, gs = _raw(got, "got")
        wb, ws = _raw(want, "want")
        if gb.shape != wb.shape or gs.shape != ws.shape:
            raise DataError(f"box_agreement got outputs of shapes {gb.shape}/{gs.shape} and {wb.shape}/{ws.shape}.")
        g_best, w_best = gs.max(-1), ws.max(-1)
        live = (g_best >= conf_threshold) | (w_best >= conf_threshold)
        k = min(min_compared, w_best.shape[-1])
        if k > 0:
            few = (w_best >= conf_threshold).sum(-1) < k  # images where the source has fewer live locations
            top = np.argsort(-w_best, axis=-1, kind="stable")[..., :k]
            extra = np.zeros_like(live)
            np.put_along_axis(extra, top, True, axis=-1)
            # A location the source scores 0 holds nothing (a sigmoid score never is 0; padding is).
            live = live | (extra & few[..., None] & (w_best > 0))
        if not live.any():
            return 1.0
        lt, rb = np.maximum(gb[..., :2], wb[..., :2]), np.minimum(gb[..., 2:], wb[..., 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        area = lambda b: np.clip(b[..., 2:] - b[..., :2], 0, None).prod(-1)  # noqa: E731
        iou = inter / np.maximum(area(gb) + area(wb) - inter, 1e-9)
        iou = np.where(np.abs(gb - wb).max(-1) <= 1e-3, 1.0, iou)  # the same box, degenerate (no area) or not
        w_cls = ws.argmax(-1)
        # The source's class, or one the artifact scores as high to rounding (two classes tied at a location).
        g_of_w = np.take_along_axis(gs, w_cls[..., None], axis=-1)[..., 0]
        same_class = (gs.argmax(-1) == w_cls) | (g_best - g_of_w <= 1e-5)
        same = same_class & (np.abs(g_best - w_best) <= score_tolerance) & (iou >= match_iou)
        return float(same[live].mean())
    if "detections" not in got or "detections" not in want:
        raise DataError("box_agreement got an NMS 'detections' output on one side only "
                        f"(keys {sorted(got)} and {sorted(want)}).")
    gd = np.asarray(got["detections"], dtype=np.float32)
    wd = np.asarray(want["detections"], dtype=np.float32)
    if len(gd) != len(wd):
        raise DataError(f"box_agreement got outputs for {len(gd)} and {len(wd)} images.")
    matched = total = 0
    for g, w in zip(gd, wd, strict=True):
        real = np.sort(w[w[:, 4] > 0, 4])[::-1]  # the source's detections (padding rows score 0)
        floor = conf_threshold
        if len(real) and (real > conf_threshold).sum() < min_compared:
            floor = min(conf_threshold, float(real[min(min_compared, len(real)) - 1]) - 1e-6)
        # The source's detections above the cut are compared; the artifact's are matched to them down to
        # score_tolerance below it (a score a rounding under the cut is the same detection, not a miss), and
        # an unmatched one counts against it only from score_tolerance above the cut.
        db = w[w[:, 4] > max(floor, 0.0)][:max_det]
        da = g[g[:, 4] > max(floor - score_tolerance, 0.0)]
        db, da = (d[np.argsort(-d[:, 4], kind="stable")] for d in (db, da))
        used_a: set[int] = set()
        if len(da) and len(db):
            iou = box_iou(da[:, :4], db[:, :4])
            iou[da[:, 5][:, None] != db[:, 5][None, :]] = 0
            pairs = np.argwhere(iou >= match_iou)
            used_b: set[int] = set()
            for i, j in pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")].tolist():
                if i not in used_a and j not in used_b:
                    used_a.add(i)
                    used_b.add(j)
        extra = [i for i in range(len(da)) if i not in used_a and da[i, 4] > floor + score_tolerance]
        matched += len(used_a)
        total += len(db) + len(used_a) + min(len(extra), max(max_det - len(used_a), 0))
    return 1.0 if total == 0 else 2 * matched / total


def _raw(outputs: dict[str, Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [k for k in ("boxes", "scores") if k not in outputs]
    if missing:
        raise DataError(
            f"{what} lacks {', '.join(missing)}: detection outputs are 'boxes' [B,N,4] and 'scores' [B,N,C] "
            f"(got keys {sorted(outputs)})."
        )
    return np.asarray(outputs["boxes"], dtype=np.float32), np.asarray(outputs["scores"], dtype=np.float32)
