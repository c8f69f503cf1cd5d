"""YOLOv8 detection loss (TAL, BCE, CIoU, DFL) and the detection KD terms."""

from __future__ import annotations

import math

import pytest
import torch

from edgekd.errors import DataError, EdgeKDError
from edgekd.tasks.detection.loss import DetectionKD, DetectionLoss, bbox_ciou, task_aligned_assign
from edgekd.tasks.detection.models import build_detector
from edgekd.testing import tiny_detector_config

TINY = tiny_detector_config()


def _batch(size: int = 64) -> dict[str, torch.Tensor]:
    """4 images, 1-2 boxes each (row 2 padded), each box painted in a colour that depends on its class."""
    torch.manual_seed(0)
    boxes = torch.tensor([
        [[8, 8, 30, 30], [0, 0, 0, 0]],
        [[20, 10, 60, 50], [4, 34, 24, 60]],
        [[10, 12, 50, 40], [0, 0, 0, 0]],
        [[30, 30, 62, 62], [2, 2, 22, 22]],
    ], dtype=torch.float32)
    classes = torch.tensor([[0, -1], [1, 0], [1, -1], [0, 1]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 1]], dtype=torch.float32)
    images = torch.rand(4, 3, size, size) * 0.2
    for i in range(4):
        for j in range(2):
            if mask[i, j]:
                x1, y1, x2, y2 = boxes[i, j].int().tolist()
                images[i, int(classes[i, j]), y1:y2, x1:x2] = 0.9
    return {"images": images, "gt_boxes": boxes, "gt_classes": classes, "gt_mask": mask}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(TINY, 2, 64)


def test_loss_finite_with_and_without_boxes():
    model, loss = _model(), DetectionLoss()
    batch = _batch()
    no_boxes = dict(batch, gt_mask=torch.zeros_like(batch["gt_mask"]))
    no_rows = dict(batch, gt_boxes=torch.zeros(4, 0, 4), gt_classes=torch.zeros(4, 0, dtype=torch.long),
                   gt_mask=torch.zeros(4, 0))
    for b in (batch, no_boxes, no_rows):
        model.zero_grad()
        total, logs = loss(model(b["images"]), model, b)
        total.backward()
        assert math.isfinite(total.item()) and set(logs) == {"box", "cls", "dfl"}
        assert all(math.isfinite(v) for v in logs.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert logs["box"] == 0.0 and logs["dfl"] == 0.0 and logs["cls"] > 0


def test_loss_under_bf16_autocast():
    model, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = DetectionLoss()(model(batch["images"]), model, batch)
    assert total.dtype == torch.float32 and math.isfinite(total.item())


def test_loss_rejects_bad_batches():
    model, batch = _model(), _batch()
    out = model(batch["images"])
    with pytest.raises(DataError, match="class id"):
        DetectionLoss()(out, model, dict(batch, gt_classes=batch["gt_classes"] + 5))
    with pytest.raises(DataError, match="no 'gt_mask'"):
        DetectionLoss()(out, model, {k: v for k, v in batch.items() if k != "gt_mask"})


def test_optimisation_reduces_loss():
    model, loss, batch = _model(), DetectionLoss(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        total, _ = loss(model(batch["images"]), model, batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < 0.6 * history[0], history


def test_assigner_picks_anchors_inside_their_box():
    anchors = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="xy"), -1).reshape(-1, 2) * 8 + 4
    n = len(anchors)
    gt = torch.tensor([[[0.0, 0.0, 24.0, 24.0], [40.0, 40.0, 64.0, 56.0]]])
    pd_boxes = torch.cat([anchors - 10, anchors + 10], -1)[None]
    scores = torch.full((1, n, 3), 0.5)
    tb, ts, fg, idx = task_aligned_assign(scores, pd_boxes, anchors, torch.tensor([[2, 1]]), gt,
                                          torch.ones(1, 2), topk=4)
    assert int(fg.sum()) == 8  # top-4 of each box
    for a, g in zip(anchors[fg[0]], idx[0][fg[0]], strict=True):
        x1, y1, x2, y2 = gt[0, g]
        assert x1 < a[0] < x2 and y1 < a[1] < y2
    assert set(ts[0][fg[0]].argmax(-1).tolist()) == {1, 2}
    assert float(ts[0].amax()) == pytest.approx(float(bbox_ciou(pd_boxes[0][:, None], gt[0][None]).clamp(0).amax()),
                                                abs=1e-5)


# ---------------------------------------------------------------------------------------------
# DetectionKD


def _outputs(seed: int, b: int = 2, n: int = 84, c: int = 3, r: int = 8, channels=(16, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 8), (4, 4), (2, 2)]
    return {
        "cls": torch.randn(b, n, c, generator=g) * 2,
        "dist": torch.randn(b, n, 4 * r, generator=g) * 2,
        "feats": [torch.randn(b, ch, *hw, generator=g) for ch, hw in zip(channels, sizes, strict=True)],
    }


def _kd(method: str, **w) -> DetectionKD:
    weights = {"cls_weight": 1.0, "box_weight": 1.0, "feature_weight": 1.0} | w
    return DetectionKD([16, 16, 32], [16, 16, 32], temperature=2.0, feature_method=method, **weights)


@pytest.mark.parametrize("method", ["cwd", "mse"])
def test_kd_terms_zero_when_student_equals_teacher(method):
    out = _outputs(0)
    total, logs = _kd(method)(out, out)  # identical channels: projectors start as the identity
    assert set(logs) == {"kd_cls", "kd_box", "kd_feat"}
    assert all(abs(v) < 1e-5 for v in logs.values()), logs
    assert abs(total.item()) < 1e-5


@pytest.mark.parametrize("method", ["cwd", "mgd", "mse"])
def test_kd_terms_positive_when_different_and_train_the_projector(method):
    kd = _kd(method)
    student = _outputs(1)
    for t in (student["cls"], student["dist"], *student["feats"]):
        t.requires_grad_(True)
    total, logs = kd(student, _outputs(2))
    assert all(v > 1e-3 for v in logs.values()), logs
    total.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in kd.parameters())
    assert float(student["cls"].grad.abs().sum()) > 0 and float(student["feats"][0].grad.abs().sum()) > 0
    if method == "mgd":
        assert len(kd.generators) == 3


def test_kd_feature_projection_between_widths():
    kd = DetectionKD([8, 16, 32], [16, 32, 64], cls_weight=0.0, box_weight=0.0, feature_weight=1.0,
                     temperature=1.0, feature_method="cwd")
    total, logs = kd(_outputs(0, channels=(8, 16, 32)), _outputs(1, channels=(16, 32, 64)))
    assert logs["kd_cls"] == 0.0 and logs["kd_box"] == 0.0 and logs["kd_feat"] > 0
    assert [p.weight.shape[:2] for p in kd.projectors] == [(16, 8), (32, 16), (64, 32)]


def test_kd_weight_zero_creates_nothing_and_skips():
    kd = _kd("mgd", feature_weight=0.0, box_weight=0.0)
    assert len(list(kd.parameters())) == 0
    out = _outputs(0)
    _, logs = kd(_outputs(1), out)
    assert logs["kd_box"] == 0.0 and logs["kd_feat"] == 0.0 and logs["kd_cls"] > 0


def test_kd_rejects_mismatched_outputs():
    with pytest.raises(EdgeKDError, match="feature_method"):
        _kd("attention")
    with pytest.raises(EdgeKDError, match="same classes"):
        _kd("mse")(_outputs(0, c=3), _outputs(0, c=4))
