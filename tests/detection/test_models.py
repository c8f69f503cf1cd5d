"""The built-in detectors: shapes, DFL decoding, save/load, export wrappers and in-graph NMS."""

from __future__ import annotations

import pytest
import torch

from edgekd.errors import AssetError, EdgeKDError
from edgekd.tasks.detection.models import (
    PRESETS,
    DetectionExport,
    DetectionExportNMS,
    DetectorConfig,
    build_detector,
    is_detector_dir,
    load_detector,
    nms_torch,
    reference_detections,
    save_detector,
    select_detections,
)
from edgekd.testing import tiny_detector_config

TINY = tiny_detector_config()


def _tiny(num_classes: int = 3, size: int = 64, seed: int = 0, config: DetectorConfig = TINY):
    """A tiny detector in eval mode with non-trivial BatchNorm statistics, so BN is exercised, and
    random head biases: a fresh model's scores tie exactly between cells, and runtimes may order
    ties differently."""
    torch.manual_seed(seed)
    model = build_detector(config, num_classes, size)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        for branch in (*model.head.cls, *model.head.box):
            branch[-1].bias.uniform_(-3.0, 1.0)
    return model.eval()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [64, 128])
def test_preset_shapes(preset, size):
    model = build_detector(preset, 5, size).eval()
    n = sum((size // s) ** 2 for s in (8, 16, 32))
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out["cls"].shape == (2, n, 5)
    assert out["dist"].shape == (2, n, 4 * model.reg_max)
    assert [f.shape[1] for f in out["feats"]] == model.feat_channels
    assert [tuple(f.shape[-2:]) for f in out["feats"]] == [(size // s, size // s) for s in (8, 16, 32)]
    assert model.anchors.shape == (n, 2) and model.stride_tensor.shape == (n, 1)
    assert model.decode(out["dist"]).shape == (2, n, 4)
    assert model.num_classes == 5 and model.config.image_size == size


def test_student_is_clearly_smaller():
    def params(name):
        return sum(p.numel() for p in build_detector(name, 3, 128).parameters())

    teacher, student = params("edgekd-det-l"), params("edgekd-det-s")
    assert 1.5e6 <= teacher <= 3.1e6 and 0.3e6 <= student <= 0.8e6
    assert teacher / student >= 3


def test_bias_prior_starts_with_few_objects():
    model = build_detector("edgekd-det-s", 4, 128).eval()
    with torch.no_grad():
        scores = model(torch.rand(1, 3, 128, 128))["cls"].sigmoid()
    assert float(scores.sum()) < 100  # a handful of expected objects, not hundreds of cells at 0.5


def test_decode_hand_made_distribution():
    model = _tiny(size=64)
    model(torch.rand(1, 3, 64, 64))  # anchors for 64 px
    r = model.reg_max
    dist = torch.full((1, model.anchors.shape[0], 4, r), -1e4)
    # location 0 (stride 8, centre (4, 4)): left 2 bins, top 1, right 3, bottom halfway between 0 and 1
    dist[0, 0, 0, 2] = dist[0, 0, 1, 1] = dist[0, 0, 2, 3] = 0.0
    dist[0, 0, 3, 0] = dist[0, 0, 3, 1] = 0.0
    # the first stride-16 location: centre (8, 8), all sides 1 bin
    j = 64
    dist[0, j, :, 1] = 0.0
    boxes = model.decode(dist.reshape(1, -1, 4 * r))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4 - 16.0, 4 - 8.0, 4 + 24.0, 4 + 4.0]))
    torch.testing.assert_close(boxes[0, j], torch.tensor([8 - 16.0, 8 - 16.0, 8 + 16.0, 8 + 16.0]))
    assert model.anchors[j].tolist() == [8.0, 8.0] and model.stride_tensor[j].item() == 16


def test_save_load_round_trip(tmp_path):
    model = _tiny()
    out_dir = tmp_path / "det"
    save_detector(model, out_dir)
    save_detector(model, out_dir)  # overwriting in place is atomic too
    assert is_detector_dir(out_dir) and not is_detector_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]  # no temporary folder left behind
    loaded = load_detector(out_dir)
    assert loaded.config == model.config and not loaded.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["dist"], b["dist"])
    with pytest.raises(AssetError, match="not an edgekd detector"):
        load_detector(tmp_path)


def test_config_errors():
    with pytest.raises(AssetError, match="Unknown detector preset"):
        build_detector("yolov8n", 3, 128)
    with pytest.raises(EdgeKDError, match="multiple of 32"):
        build_detector("edgekd-det-s", 3, 100)


def test_detection_export_equals_model_and_sigmoid():
    model = _tiny()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        boxes, scores = DetectionExport(model)(x)
        out = model(x)
    torch.testing.assert_close(boxes, model.decode(out["dist"]))
    torch.testing.assert_close(scores, out["cls"].sigmoid())


def test_nms_torch_greedy():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms_torch(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms_torch(boxes, scores, 0.5, classes=torch.tensor([0, 1, 0, 0])).tolist() == [3, 1, 2]


def _clustered(seed: int, b: int = 3, n: int = 400, c: int = 3, size: float = 128.0):
    """Random boxes bunched around a few centres (many overlaps, long enough suppression chains)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(b, 6, 2, generator=g) * size
    which = torch.randint(0, 6, (b, n), generator=g)
    ctr = centres.gather(1, which.unsqueeze(-1).expand(-1, -1, 2)) + torch.randn(b, n, 2, generator=g) * 5
    wh = 8 + torch.rand(b, n, 2, generator=g) * 40
    return torch.cat([ctr - wh / 2, ctr + wh / 2], -1), torch.rand(b, n, c, generator=g) ** 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou,max_det,topk", [(0.5, 100, 300), (0.3, 20, 64), (0.7, 300, 1000)])
def test_in_graph_nms_equals_greedy(seed, iou, max_det, topk):
    boxes, scores = _clustered(seed)
    kw = dict(max_det=max_det, iou_threshold=iou, score_threshold=0.05, pre_nms_topk=topk)
    got = select_detections(boxes, scores, **kw)
    assert got.shape == (3, max_det, 6)
    assert torch.equal(got, reference_detections(boxes, scores, **kw))


def test_cluster_nms_settles_a_chain():
    """A suppression chain (each box overlaps only its neighbours, scores decreasing): greedy keeps
    every other box; Fast-NMS (1 iteration) keeps only the first; Cluster-NMS gets there."""
    x = torch.arange(8, dtype=torch.float32) * 2  # IoU 0.67 with a neighbour, 0.43 one further
    boxes = torch.stack([x, torch.zeros(8), x + 10, torch.full((8,), 10.0)], -1)[None]
    scores = torch.linspace(0.9, 0.5, 8)[None, :, None]
    want = reference_detections(boxes, scores, iou_threshold=0.5, max_det=8)
    assert (want[0, :, 4] > 0).sum() == 4
    assert not torch.equal(select_detections(boxes, scores, iou_threshold=0.5, max_det=8, iterations=1), want)
    assert torch.equal(select_detections(boxes, scores, iou_threshold=0.5, max_det=8, iterations=8), want)


def _ties_in_one_order(det: torch.Tensor) -> torch.Tensor:
    """``det`` [B, N, 6] with the rows of exactly equal scores put in one order (by class, then box):
    sorting tells tied detections apart by no rule, and two sorts may order them differently."""
    out = det.clone()
    for b in range(det.shape[0]):
        rows = det[b]
        order = torch.arange(rows.shape[0])
        for col in (3, 2, 1, 0, 5):  # least significant first; each sort is stable
            order = order[torch.sort(rows[order, col], stable=True).indices]
        order = order[torch.sort(rows[order, 4], descending=True, stable=True).indices]
        out[b] = rows[order]
    return out


def test_nms_wrapper_on_model_outputs():
    model = _tiny()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        (det,) = DetectionExportNMS(model, max_det=120, score_threshold=0.01)(x)  # 84 locations < max_det
        boxes, scores = DetectionExport(model)(x)
    assert det.shape == (2, 120, 6)
    want = reference_detections(boxes, scores, max_det=120, score_threshold=0.01)
    # On some CPUs (one thread, AVX-512) two cells score exactly alike: the same detections, in either order.
    assert torch.equal(_ties_in_one_order(det), _ties_in_one_order(want))
    assert torch.equal(det[..., 4], want[..., 4])  # scores in the same descending order
    assert (det[:, 84:] == 0).all()


class _BothWrappers(torch.nn.Module):
    """Both export wrappers' outputs from one graph (the model runs once): one dynamo export checks
    both, and the test stays a few seconds."""

    def __init__(self, model):
        super().__init__()
        self.plain, self.nms = DetectionExport(model), DetectionExportNMS(model, score_threshold=0.01)

    def forward(self, images):
        boxes, scores = self.plain(images)
        return boxes, scores, select_detections(boxes, scores, **self.nms.kw)


def _max_row_distance(got: torch.Tensor, want: torch.Tensor) -> float:
    """Order-free distance between detection sets [B,K,6]: a tiny model's scores nearly tie, and
    runtimes may order (but not choose) near-tied detections differently."""
    d = (got[:, :, None, :] - want[:, None, :, :]).abs().amax(-1)
    return float(torch.maximum(d.amin(2).amax(), d.amin(1).amax()))


@pytest.mark.slow  # the dynamo exporter takes 5-10 s, even for the smallest graph
def test_onnx_export_matches_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    shallow = DetectorConfig(**{**TINY.to_dict(), "depths": (0, 0, 0, 1)})  # every block type, fewer nodes
    module = _BothWrappers(_tiny(config=shallow)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(module, (torch.rand(2, 3, 64, 64),), dynamo=True, opset_version=18,
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    sess = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for bs in (1, 3):
        x = torch.rand(bs, 3, 64, 64)
        with torch.no_grad():
            boxes, scores, det = module(x)
        got = [torch.from_numpy(a) for a in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]
        assert [g.shape for g in got] == [boxes.shape, scores.shape, det.shape]
        assert float((got[0] - boxes).abs().max()) < 1e-4
        assert float((got[1] - scores).abs().max()) < 1e-4
        assert (got[2][..., 4] > 0).sum() == (det[..., 4] > 0).sum()
        assert _max_row_distance(got[2], det) < 1e-4
