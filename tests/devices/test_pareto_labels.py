"""The Pareto plot names every point readably: no label covers another label, a point or the legend."""

from __future__ import annotations

import itertools

import pytest

from edgekd.devices.tables import pareto_figure, text_box

NAMES = ["onnx", "onnx-int8", "onnx-int8-static", "onnx-fp16", "torchscript-lite", "executorch",
         "executorch-int8", "coreml", "pytorch-student", "pytorch-student-pruned", "pytorch-teacher", "tensorrt"]


def _data(points: list[tuple[float, float]]) -> dict:
    results = [{"name": n, "kind": "artifact", "target": n.split("-")[0], "precision": "fp32", "accuracy": acc,
                "cases": [{"batch": 1, "seq": None, "p50_ms": ms}]} for n, (ms, acc) in zip(NAMES, points, strict=False)]
    return {"run": "dense", "profile": {"name": "local"}, "headline": {"batch": 1, "seq": None},
            "reference": {"teacher": 0.9}, "metric": "accuracy", "results": results}


DENSE = [  # a float and its quantized forms a few microseconds apart, the eager models far away
    (0.250, 0.880), (0.251, 0.879), (0.252, 0.881), (0.249, 0.880), (0.253, 0.878), (0.248, 0.882),
    (0.251, 0.881), (0.250, 0.879), (4.0, 0.880), (3.9, 0.875), (9.0, 0.900), (0.252, 0.880),
]


@pytest.mark.parametrize("points", [DENSE, [(1.0, 0.8)], DENSE[:3]], ids=["dense", "one", "three"])
def test_labels_overlap_no_label_no_point_and_stay_inside(points):
    fig, labels = pareto_figure(_data(points))
    fig.canvas.draw()  # where the labels are in the drawn figure, not only where they were placed
    renderer = fig.canvas.get_renderer()
    boxes = [text_box(t, renderer) for t in labels]
    assert sorted(t.get_text() for t in labels) == sorted(NAMES[: len(points)])
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"{labels[i].get_text()!r} overlaps {labels[j].get_text()!r}"
    ax = fig.axes[0]
    area, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    marks = [ax.transData.transform(p) for p in points]
    for t, box in zip(labels, boxes, strict=True):
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, t.get_text()
        assert not box.overlaps(legend), t.get_text()
        assert not any(box.contains(x, y) for x, y in marks), t.get_text()


def test_the_old_fixed_offset_would_overlap_in_the_dense_case():
    """The dense case really is dense: labels at one fixed offset (the old layout) would collide."""
    fig, labels = pareto_figure(_data(DENSE))
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    fixed = [ax.annotate(n, p, textcoords="offset points", xytext=(4, 4), fontsize=8) for n, p in zip(NAMES, DENSE, strict=True)]
    boxes = [t.get_window_extent(renderer) for t in fixed]
    assert any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
