"""Every export target on a tiny detector, through the same export_all the pipeline uses: each
artifact is loaded by its Runner and compared with the source on real synthetic images (box
agreement after NMS, max abs diff, mAP of both)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgekd.export.stage import export_all
from edgekd.recipe import ExportConfig
from edgekd.tasks.detection.data import load_yolo
from edgekd.tasks.detection.models import build_detector
from edgekd.tasks.detection.synthetic import CLASS_NAMES, generate
from edgekd.tasks.detection.task import DetectionTask
from edgekd.testing import tiny_detector_config

TINY = tiny_detector_config()
TARGETS = ["onnx", "executorch", "torchscript-lite", "coreml", "tensorrt"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = generate(root / "set", n_train=1, n_val=1, n_test=6, image_size=64, seed=3)
    test = load_yolo(data, "test", 64)
    return test.collate(np.arange(len(test)))["images"], test.ground_truth()


@pytest.mark.slow
def test_every_exporter_runs_on_the_tiny_detector(tmp_path, images):
    torch.manual_seed(0)
    model = build_detector(TINY, len(CLASS_NAMES), 64).eval()
    with torch.no_grad():  # untrained heads give tied scores; spread them so NMS order is defined
        for branch in model.head.cls:
            branch[-1].bias.uniform_(-3, 3)
    task = DetectionTask(list(CLASS_NAMES), 64)
    inputs, labels = images
    cfg = ExportConfig(targets=TARGETS, parity_examples=6, parity_batch_size=2)
    meta = {"task": task.name, "labels": task.label_names, **task.export_meta()}
    records = export_all(task.export_module(model), task.model_io(), TARGETS, tmp_path, cfg, {"images": inputs},
                         labels, task.metrics, meta, [], task.agreement, task.export_defaults)
    # The task's own default: ExecuTorch at fixed shapes (XNNPACK plans a detector's convolutions for
    # the traced batch only), recorded as the task's, not lowered dynamically first.
    assert records["executorch"]["task_defaults"] == {"dynamic": False}

    for target in ("onnx", "executorch", "torchscript-lite"):
        rec = records[target]
        assert rec["status"] == "ok", rec
        parity = rec["parity"]
        assert parity["ran"] and parity["box_agreement"] >= 0.95, (target, parity)
        assert parity["max_abs_diff"] < 1e-2, (target, parity)  # boxes are in pixels
        assert abs(parity["artifact_metric"]["map50_95"] - parity["source_metric"]["map50_95"]) < 0.02
        meta = json.loads((tmp_path / target / "artifact.json").read_text())
        assert meta["task"] == "detection" and meta["image_size"] == 64 and meta["labels"] == list(CLASS_NAMES)
    # Every artifact answers any batch size (ExecuTorch: a fixed-shape program whose runner feeds it row
    # by row).
    from edgekd.export.stage import load_artifact

    for target in ("onnx", "executorch", "torchscript-lite"):
        runner, _ = load_artifact(tmp_path / target)
        for n in (1, 3):
            out = runner.run({"images": inputs[:n]})
            assert out["boxes"].shape[0] == n and out["scores"].shape[:2] == out["boxes"].shape[:2], target
    # Core ML converts here and predicts only on macOS; TensorRT builds where it is installed.
    assert records["coreml"]["status"] in ("ok", "unavailable"), records["coreml"]
    if records["coreml"]["status"] == "ok":
        assert records["coreml"]["parity"]["ran"] is False and "macOS" in records["coreml"]["parity"]["reason"]
    trt = records["tensorrt"]
    assert trt["status"] in ("not_built", "ok"), trt
    if trt["status"] == "not_built":
        assert (tmp_path / "tensorrt" / "model.onnx").is_file() and "trtexec" in (tmp_path / "tensorrt" / "trtexec.sh").read_text()


def test_a_wrong_detector_graph_fails_parity_though_nothing_scores_the_threshold(tmp_path, images):
    """An untrained detector scores no location at detection.conf_threshold (0.25). A graph returning its boxes
    moved by 20 px and its scores halved must still fail parity: box agreement compares the best-scoring
    locations, and the default difference gate (no export.max_abs_diff set) checks the raw outputs."""
    from edgekd.errors import ParityError

    torch.manual_seed(0)
    model = build_detector(TINY, len(CLASS_NAMES), 64).eval()
    task = DetectionTask(list(CLASS_NAMES), 64)
    source = task.export_module(model)

    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, images):
            boxes, scores = self.module(images)
            return boxes + 20.0, scores * 0.5

    inputs, labels = images
    with torch.no_grad():
        assert float(source(torch.from_numpy(inputs))[1].max()) < 0.25  # nothing live at the threshold
    meta = {"task": task.name, "labels": task.label_names, **task.export_meta()}

    def stage(module, out):  # detect-default's threshold: box agreement 0.95, no max_abs_diff
        cfg = ExportConfig(targets=["torchscript-lite"], parity_examples=6, min_top1_agreement=0.95)
        return export_all(module, task.model_io(), ["torchscript-lite"], out, cfg, {"images": inputs}, labels,
                          task.metrics, meta, [], task.agreement, reference=source)

    with pytest.raises(ParityError, match=r"box agreement 0 < required 0.95; output 'boxes': max abs diff 20") as info:
        stage(Broken(source), tmp_path / "broken")
    assert info.value.records["torchscript-lite"]["parity"]["passed"] is False
    rec = stage(source, tmp_path / "right")["torchscript-lite"]  # the right graph of the same detector passes
    assert rec["parity"]["passed"] and rec["parity"]["box_agreement"] == 1.0
    assert rec["parity"]["tolerance"]["from"] == "default"
