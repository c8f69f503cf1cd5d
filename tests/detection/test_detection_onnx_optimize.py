"""``export.options.onnx.optimize: true`` fuses transformer blocks for ONNX Runtime; a detector's graph has none
(the audit's detector: 234 -> 232 nodes, no fusion), so a detection recipe is refused with it, as
``quantize.fuse`` is, before any stage runs. A text recipe keeps it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.errors import RecipeError
from edgekd.recipe import load_recipe
from edgekd.recipe_check import check_inputs

REFUSAL = ("export.options.onnx.optimize: it fuses transformer blocks (Attention, SkipLayerNorm, BiasGelu) for ONNX "
           "Runtime, which find nothing to fuse in a detector's convolutions (its graph comes out the same, save a "
           "node or two), and the file then runs on ONNX Runtime only: remove it")


def test_onnx_optimize_is_refused_for_a_detector_before_any_stage():
    from edgekd.api import check_up_front

    recipe = load_recipe("detect-default", ["export.options={onnx: {optimize: true}}"])
    assert check_inputs(recipe) == [REFUSAL]
    with pytest.raises(RecipeError, match="export.options.onnx.optimize"):
        check_up_front(recipe)
    # optimize: false fuses nothing, and the ONNX export's other options apply to a detector
    assert check_inputs(load_recipe("detect-default", ["export.options={onnx: {optimize: false, opset: 18}}"])) == []
    # a prune search exports ONNX with the options too: refused there the same way
    search = ["prune.keep_params=null", "prune.steps=null", "prune.max_accuracy_drop=0.02"]
    assert REFUSAL in check_inputs(load_recipe("detect-default", [*search, "export.options={onnx: {optimize: true}}"]))
    # the text family's transformer graph is what it fuses
    assert check_inputs(load_recipe("default", ["export.options={onnx: {optimize: true}}"])) == []


@pytest.mark.slow  # one ONNX export of a tiny detector, optimized
def test_the_transformer_fusions_find_nothing_in_a_detector(tmp_path):
    from edgekd.export import get_exporter
    from edgekd.tasks.detection.models import build_detector
    from edgekd.tasks.detection.synthetic import CLASS_NAMES
    from edgekd.tasks.detection.task import DetectionTask
    from edgekd.testing import tiny_detector_config

    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(), len(CLASS_NAMES), 64).eval()
    task = DetectionTask(list(CLASS_NAMES), 64)
    images = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    res = get_exporter("onnx").export(task.export_module(model), {"images": images}, task.model_io(),
                                      tmp_path / "opt", optimize=True)
    assert res.notes["optimized"] is True and res.notes["fusions"] == {}  # (only the fusions that matched)
