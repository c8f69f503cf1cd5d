"""COCO mAP on hand-made cases whose value is derived by hand, and box agreement."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.errors import DataError
from edgekd.tasks.detection.metrics import box_agreement, coco_map, detection_metrics


def gt(*rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def det(*rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 6)


def test_perfect_predictions_score_one():
    truth = [gt([0, 10, 10, 50, 50], [1, 60, 5, 90, 40]), gt([2, 0, 0, 30, 20]), gt([1, 5, 5, 25, 25])]
    preds = [det(*[[*r[1:], 0.9 - 0.1 * k, r[0]] for k, r in enumerate(t)]) for t in truth]
    assert coco_map(preds, truth, num_classes=3) == {"map50_95": pytest.approx(1.0), "map50": pytest.approx(1.0)}


def test_false_positive_ranked_above_the_true_positive():
    # One class, one gt. Ranked: FP (0.9), TP (0.8) -> (recall, precision) = (0, 0), (1, 1/2).
    # COCO makes precision non-increasing from the right: [1/2, 1/2]; each of the 101 recall points
    # 0, 0.01, ..., 1 then reads precision 1/2 (searchsorted left), so AP = 1/2 at every IoU threshold.
    truth = [gt([0, 10, 10, 50, 50])]
    preds = [det([60, 60, 90, 90, 0.9, 0], [10, 10, 50, 50, 0.8, 0])]
    assert coco_map(preds, truth, 1) == {"map50_95": pytest.approx(0.5), "map50": pytest.approx(0.5)}
    # A second gt nobody finds caps recall at 1/2: the 51 recall points 0..0.50 read 1/2, the 50 above
    # read 0, so AP = 51 * 0.5 / 101 = 25.5 / 101.
    truth = [gt([0, 10, 10, 50, 50], [0, 100, 100, 120, 120])]
    assert coco_map(preds, truth, 1) == {"map50_95": pytest.approx(25.5 / 101), "map50": pytest.approx(25.5 / 101)}


def test_shifted_box_counts_only_at_low_iou_thresholds():
    # gt 100x100 at x=0; prediction shifted right by 23: IoU = 77*100 / (123*100) = 0.626, which
    # matches at the thresholds 0.50, 0.55, 0.60 and fails at 0.65..0.95: map50 = 1, map50_95 = 3/10.
    truth = [gt([0, 0, 0, 100, 100])]
    preds = [det([23, 0, 123, 100, 0.9, 0])]
    assert coco_map(preds, truth, 1) == {"map50_95": pytest.approx(0.3), "map50": pytest.approx(1.0)}


def test_classes_are_averaged_and_wrong_class_is_a_miss():
    # class 0 found perfectly (AP 1); class 1's only gt predicted as class 0 (AP 0) -> mean 0.5.
    # The class-0 false positive ranks below the true positive, so class 0 keeps AP 1.
    truth = [gt([0, 0, 0, 20, 20], [1, 50, 50, 80, 80])]
    preds = [det([0, 0, 20, 20, 0.9, 0], [50, 50, 80, 80, 0.8, 0])]
    assert coco_map(preds, truth, 2)["map50"] == pytest.approx(0.5)


def test_no_predictions_and_no_ground_truth():
    truth = [gt([0, 0, 0, 10, 10]), gt()]
    assert coco_map([det(), det()], truth, 1) == {"map50_95": 0.0, "map50": 0.0}
    with pytest.raises(DataError, match="No ground-truth boxes in 2 image"):
        coco_map([det([0, 0, 10, 10, 0.9, 0]), det()], [gt(), gt()], 1)
    with pytest.raises(DataError, match="predictions for 1 images but ground truth for 2"):
        coco_map([det()], truth, 1)


def raw_outputs(rows_per_image: list[list[tuple]], n: int = 8, c: int = 3) -> dict[str, np.ndarray]:
    """Raw [B,N,4]/[B,N,C] outputs with the given (box, class, score) at the first locations."""
    boxes = np.zeros((len(rows_per_image), n, 4), np.float32)
    scores = np.zeros((len(rows_per_image), n, c), np.float32)
    for b, rows in enumerate(rows_per_image):
        for k, (box, cls, score) in enumerate(rows):
            boxes[b, k], scores[b, k, cls] = box, score
    return {"boxes": boxes, "scores": scores}


def test_detection_metrics_from_raw_outputs_and_object_labels():
    outputs = raw_outputs([[((10, 10, 50, 50), 0, 0.9)], [((0, 0, 30, 20), 2, 0.8)]])
    labels = np.empty(2, dtype=object)
    labels[0], labels[1] = gt([0, 10, 10, 50, 50]), gt([2, 0, 0, 30, 20])
    assert detection_metrics(outputs, labels) == {"map50_95": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    assert detection_metrics({k: v[:1] for k, v in outputs.items()}, np.asarray(labels)[:1])["map50"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="lacks scores"):
        detection_metrics({"boxes": outputs["boxes"]}, labels)


def test_box_agreement():
    a = raw_outputs([[((10, 10, 50, 50), 0, 0.9), ((60, 60, 90, 90), 1, 0.8)], [((0, 0, 30, 20), 2, 0.8)]])
    assert box_agreement(a, a) == 1.0
    disjoint = raw_outputs([[((100, 100, 120, 120), 0, 0.9)], [((0, 0, 30, 20), 1, 0.8)]])  # far, other class
    assert box_agreement(a, disjoint) == 0.0
    # location by location over the 3 live ones: a box moved a little (IoU 0.95 >= 0.9, score within
    # 0.1) agrees; one gone disagrees; one with the same box but a score 0.3 lower disagrees
    b = raw_outputs([[((10, 10, 50, 48), 0, 0.85)], [((0, 0, 30, 20), 2, 0.5)]])
    assert box_agreement(a, b) == pytest.approx(1 / 3)
    # a score either side of the threshold is not a disagreement (both under NMS would differ)
    c = raw_outputs([[((10, 10, 50, 50), 0, 0.251)], []])
    d = raw_outputs([[((10, 10, 50, 50), 0, 0.249)], []])
    assert box_agreement(c, d) == 1.0
    empty = raw_outputs([[], []])
    assert box_agreement(empty, empty) == 1.0
    assert box_agreement(a, empty) == 0.0


def test_box_agreement_compares_the_best_locations_when_none_is_live():
    """A detector that scores nothing at conf_threshold (an untrained one, a hard image) is still compared, on
    the source's best-scoring locations: boxes moved by 20 px and scores halved do not agree."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (2, 16, 2)).astype(np.float32)
    want = {"boxes": np.concatenate([xy, xy + rng.uniform(8, 40, (2, 16, 2)).astype(np.float32)], -1),
            "scores": rng.uniform(0.01, 0.2, (2, 16, 3)).astype(np.float32)}  # all under the default 0.25
    broken = {"boxes": want["boxes"] + 20, "scores": want["scores"] * 0.5}
    assert box_agreement(broken, want) == 0.0
    assert box_agreement(want, want) == 1.0
    # An image with enough live locations compares those only (the threshold decides, as before).
    live = {k: v.copy() for k, v in want.items()}
    live["scores"][:, :12, 0] = 0.9
    moved = {k: v.copy() for k, v in live.items()}
    moved["boxes"][:, 12:] += 20  # only locations under the threshold differ
    assert box_agreement(moved, live) == 1.0
    # After NMS the same: detections under conf_threshold are compared when the source has no other.
    dets = np.zeros((1, 4, 6), np.float32)
    dets[0, :2] = [(10, 10, 50, 50, 0.1, 0), (60, 60, 90, 90, 0.05, 1)]
    shifted = dets.copy()
    shifted[0, :2, :4] += 20
    assert box_agreement({"detections": shifted}, {"detections": dets}) == 0.0
    assert box_agreement({"detections": dets}, {"detections": dets}) == 1.0


def dets(rows):
    """An NMS-in-graph ``detections`` output of one image: ``rows`` of (x1, y1, x2, y2, score, class), padded."""
    out = np.zeros((1, 4, 6), np.float32)
    for k, r in enumerate(rows):
        out[0, k] = r
    return {"detections": out}


def test_box_agreement_after_nms_in_the_graph():
    a = dets([(10, 10, 50, 50, 0.9, 0), (60, 60, 90, 90, 0.8, 1)])
    assert box_agreement(a, a) == 1.0
    b = dets([(10, 10, 50, 49, 0.9, 0)])  # one matched of 2 + 1 detections
    assert box_agreement(a, b) == pytest.approx(2 / 3)


def test_box_agreement_after_nms_keeps_a_detection_a_rounding_below_the_cut():
    """The cut (conf_threshold, or just under the source's min_compared-th best score) is the source's: an
    artifact's copy of a detection that lands a hair under it is the same detection, not a miss and an extra."""
    want = dets([(10, 10, 50, 50, 0.30, 0), (60, 60, 90, 90, 0.26, 1)])
    got = dets([(10, 10, 50, 50, 0.30, 0), (60, 60, 90, 90, 0.2499, 1)])  # under conf_threshold 0.25 by 1e-4
    assert box_agreement(got, want, conf_threshold=0.25) == 1.0
    low = dets([(10, 10, 50, 50, 0.10, 0), (60, 60, 90, 90, 0.05, 1)])  # nothing live: the source's best ones
    low_got = dets([(10, 10, 50, 50, 0.10, 0), (60, 60, 90, 90, 0.049998, 1)])
    assert box_agreement(low_got, low, conf_threshold=0.25) == 1.0
    # An artifact detection the source does not have still counts against it, from score_tolerance above the cut.
    extra = dets([(10, 10, 50, 50, 0.30, 0), (60, 60, 90, 90, 0.26, 1), (100, 100, 140, 140, 0.9, 0)])
    assert box_agreement(extra, want, conf_threshold=0.25) == pytest.approx(4 / 5)
