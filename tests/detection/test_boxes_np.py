"""Box geometry: NMS against its literal definition, class separation, letterbox round trips."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.errors import DataError
from edgekd.tasks.detection.boxes_np import (
    batched_nms,
    box_iou,
    letterbox,
    nms,
    postprocess,
    unletterbox_boxes,
)


def random_boxes(rng: np.random.Generator, n: int, extent: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(1, extent / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def iou_one(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def reference_nms(boxes, scores, thr) -> list[int]:
    """The definition: take the highest remaining score, drop all with IoU > thr, repeat."""
    remaining = list(range(len(boxes)))
    keep = []
    while remaining:
        best = max(remaining, key=lambda i: (scores[i], -i))
        keep.append(best)
        remaining = [i for i in remaining if i != best and iou_one(boxes[best], boxes[i]) <= thr]
    return keep


def test_box_iou_matches_scalar_definition():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    want = np.array([[iou_one(x, y) for y in b] for x in a])
    np.testing.assert_allclose(box_iou(a, b), want, rtol=1e-12)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 5)
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0  # empty boxes: no division by zero


@pytest.mark.parametrize("seed", range(60))
def test_nms_equals_bruteforce_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    boxes = random_boxes(rng, n, extent=rng.choice([30.0, 100.0]))  # small extent: many overlaps
    scores = rng.random(n)
    thr = float(rng.uniform(0.1, 0.9))
    got = nms(boxes, scores, thr)
    assert got.dtype == np.int64
    assert got.tolist() == reference_nms(boxes, scores, thr)
    assert np.all(np.diff(scores[got]) <= 0)  # highest score first


def test_nms_keeps_exact_threshold_and_breaks_ties_by_index():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10]], dtype=float)  # IoU(0,2) = 1/3
    assert nms(boxes, [0.5, 0.5, 0.4], 1 / 3 + 1e-9).tolist() == [0, 2]
    assert nms(boxes, [0.5, 0.5, 0.4], 0.3).tolist() == [0]


@pytest.mark.parametrize("seed", range(20))
def test_batched_nms_is_nms_per_class(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 50))
    boxes = random_boxes(rng, n, extent=40.0) - 20  # negative coordinates too
    scores, classes = rng.random(n), rng.integers(0, 4, n)
    got = batched_nms(boxes, scores, classes, 0.5)
    want = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        want += idx[nms(boxes[idx], scores[idx], 0.5)].tolist()
    assert sorted(got.tolist()) == sorted(want)
    assert np.all(np.diff(scores[got]) <= 0)


def test_batched_nms_never_suppresses_across_classes():
    boxes = np.tile([[10.0, 10, 50, 50]], (4, 1))
    assert sorted(batched_nms(boxes, [0.9, 0.8, 0.7, 0.6], [0, 1, 2, 0], 0.5).tolist()) == [0, 1, 2]
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).shape == (0,)


@pytest.mark.parametrize(("h", "w"), [(100, 200), (300, 120), (64, 64), (17, 250), (128, 128)])
def test_letterbox_round_trip(h, w):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    out, scale, (px, py) = letterbox(image, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert scale == pytest.approx(min(128 / w, 128 / h))
    # the content is centred: padding (fill 114) on both sides of the short axis, none on the long one
    new_w, new_h = round(w * scale), round(h * scale)
    assert (px, py) == ((128 - new_w) // 2, (128 - new_h) // 2)
    if py:
        assert np.all(out[: int(py)] == 114) and np.all(out[int(py) + new_h :] == 114)
    if px:
        assert np.all(out[:, : int(px)] == 114) and np.all(out[:, int(px) + new_w :] == 114)
    boxes = np.concatenate([rng.uniform(0, [w / 2, h / 2], (6, 2)), rng.uniform([w / 2, h / 2], [w, h], (6, 2))], 1)
    in_letterbox = boxes * scale + [px, py, px, py]
    np.testing.assert_allclose(unletterbox_boxes(in_letterbox, scale, (px, py), w, h), boxes, rtol=1e-5, atol=1e-3)


def test_unletterbox_clips_to_the_image():
    got = unletterbox_boxes(np.array([[-10.0, -10, 500, 500]]), 0.5, (0.0, 32.0), 200, 100)
    np.testing.assert_allclose(got, [[0, 0, 200, 100]])


def test_letterbox_accepts_grey_and_rgba_and_rejects_other_input():
    assert letterbox(np.zeros((10, 20), np.uint8), 32)[0].shape == (32, 32, 3)
    assert letterbox(np.zeros((10, 20, 4), np.uint8), 32)[0].shape == (32, 32, 3)
    with pytest.raises(DataError, match="uint8"):
        letterbox(np.zeros((10, 20, 3), np.float32), 32)
    with pytest.raises(DataError, match="HWC"):
        letterbox(np.zeros((10, 20, 3, 1), np.uint8), 32)


def test_postprocess_best_class_threshold_nms_and_max_det():
    boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]]], float)
    scores = np.array([[[0.9, 0.1], [0.8, 0.0], [0.0, 0.7], [0.2, 0.1], [0.3, 0.6]]])
    (det,) = postprocess(boxes, scores, conf_threshold=0.25, iou_threshold=0.5)
    assert det.dtype == np.float32 and det.shape == (3, 6)
    # box 1 is suppressed by box 0 (same class), box 2 survives (other class), box 3 is under the threshold
    np.testing.assert_allclose(det[:, 4], [0.9, 0.7, 0.6])
    np.testing.assert_allclose(det[:, 5], [0, 1, 1])
    np.testing.assert_allclose(det[2, :4], [70, 70, 80, 80])
    assert postprocess(boxes, scores, max_det=1)[0].shape == (1, 6)
    assert postprocess(boxes, scores * 0)[0].shape == (0, 6)
    with pytest.raises(DataError, match=r"boxes \[B,N,4\]"):
        postprocess(boxes[0], scores)
