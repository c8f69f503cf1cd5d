"""What parity holds an export to where the recipe sets no thresholds (the default difference gate by
precision), the graph a TensorRT engine is built from checked under ONNX Runtime where TensorRT is not
installed, and options a target would accept without reading (ExecuTorch's max_batch at fixed shapes,
threads for runners that do not apply them)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from export_helpers import MAX_LENGTH

from edgekd.errors import ParityError, RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.parity import DEFAULT_TOLERANCES, ParityGate, ParityReport
from edgekd.export.stage import export_all, load_artifact
from edgekd.recipe import ExportConfig
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

torch = pytest.importorskip("torch")

META = {"labels": ["negative", "positive"], "max_length": MAX_LENGTH, "source_model": "tiny-bert",
        "task": "text-classification"}
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


class Scaled(torch.nn.Module):
    """A wrong graph with the source's argmax: logits x3."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, input_ids, attention_mask):
        return (self.module(input_ids, attention_mask)[0] * 3,)


class NoMask(torch.nn.Module):
    """A wrong graph that ignores the attention mask (right at real lengths, wrong on padded batches)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, input_ids, attention_mask):
        return (self.module(input_ids, torch.ones_like(attention_mask))[0],)


def _stage(module, data, out, targets, reference=None, **cfg):
    inputs, labels = data
    return export_all(module, TEXT_IO, targets, out, ExportConfig(targets=targets, **cfg), inputs, labels,
                      classification_metrics, META, [], reference=reference)


@pytest.mark.parametrize("wrong", [Scaled, NoMask], ids=["logits-x3", "mask-ignored"])
def test_a_wrong_graph_fails_the_default_gate_of_a_recipe_without_thresholds(wrong, text_module, text_data, tmp_path):
    """export.max_abs_diff and min_top1_agreement unset (None): the per-precision default gate still applies.
    Both graphs agree with the source on top-1 everywhere, so only a difference gate catches them."""
    with pytest.raises(ParityError, match=r"output 'logits': max abs diff .* > allowed .* \(default for fp32") as info:
        _stage(wrong(text_module), text_data, tmp_path, ["torchscript-lite"], reference=text_module)
    parity = info.value.records["torchscript-lite"]["parity"]
    assert parity["passed"] is False and parity["top1_agreement"] == 1.0
    tol = parity["tolerance"]
    assert tol["from"] == "default" and tol["precision"] == "fp32"
    assert (tol["atol"], tol["rtol"]) == (DEFAULT_TOLERANCES["fp32"].atol, DEFAULT_TOLERANCES["fp32"].rtol)
    with pytest.raises(ParityError, match="failed its parity check"):
        load_artifact(tmp_path / "torchscript-lite")


def test_the_gate_applied_is_recorded_with_where_it_came_from(text_module, text_data, tmp_path):
    rec = _stage(text_module, text_data, tmp_path / "default", ["torchscript-lite"])["torchscript-lite"]
    parity = rec["parity"]
    assert parity["passed"] is True
    tol = parity["tolerance"]
    assert tol["from"] == "default" and tol["precision"] == "fp32" and tol["min_top1_agreement"]["from"] == "none"
    source_max = parity["outputs"]["logits"]["source_max_abs"]
    assert tol["allowed"]["logits"] == pytest.approx(1e-5 + 1e-3 * source_max, rel=1e-5)
    assert parity["real_lengths"]["tolerance"]["from"] == "default"
    meta = json.loads((tmp_path / "default" / "torchscript-lite" / "artifact.json").read_text())
    assert meta["parity"]["tolerance"] == tol
    # The recipe's own threshold replaces the default, and the record says so.
    rec = _stage(text_module, text_data, tmp_path / "recipe", ["torchscript-lite"], max_abs_diff=0.5,
                 min_top1_agreement=0.9)["torchscript-lite"]
    tol = rec["parity"]["tolerance"]
    assert tol["from"] == "recipe" and tol["max_abs_diff"] == 0.5 and tol["allowed"] == {"logits": 0.5}
    assert tol["min_top1_agreement"] == {"value": 0.9, "from": "recipe"}


def test_the_summary_line_shows_the_tolerance():
    report = ParityReport(target="t", examples=4, max_abs_diff=0.5, mean_abs_diff=0.1, top1_agreement=1.0,
                          artifact_metric=None, source_metric=None, batch_size=4, seconds=0.0,
                          outputs={"logits": {"max_abs_diff": 0.5, "source_max_abs": 2.0}})
    misses = ParityGate(precision="fp16").apply(report)
    assert misses and "default for fp16" in misses[0]
    assert "(allowed 0.05, default for fp16: 0.01 + 0.02 x max|source|)" in report.summary()
    ParityGate(max_abs_diff=1.0).apply(report)
    assert "(allowed 1, export.max_abs_diff)" in report.summary()
    assert ParityGate(precision="int8-dynamic").apply(report) == []  # int8: the quantize stage's guard
    assert report.tolerance["from"] == "none"


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the graph parity made where TensorRT is not installed")
def test_tensorrt_checks_the_graph_its_engine_is_built_from_under_onnx_runtime(text_module, text_data, tmp_path):
    rec = _stage(text_module, text_data, tmp_path / "ok", ["tensorrt"])["tensorrt"]
    parity = rec["parity"]
    assert rec["status"] == "not_built" and parity["ran"] is False and "trtexec.sh" in parity["reason"]
    assert "passed" not in parity  # the engine itself is not checked here
    graph = parity["graph"]
    assert graph["ran"] is True and graph["passed"] is True and graph["top1_agreement"] == 1.0
    assert "model_fp16.onnx" in graph["checks"] and "run by ONNX Runtime" in graph["checks"]
    assert "not the engine" in graph["checks"]
    assert graph["tolerance"]["from"] == "default" and graph["tolerance"]["precision"] == "fp16"
    assert graph["real_lengths"]["examples"] > 0
    # A graph that does not answer as its source fails the stage, and the folder is marked failed.
    with pytest.raises(ParityError, match=r"'tensorrt': \(its fp16 ONNX graph model_fp16.onnx .*\) output 'logits'"):
        _stage(Scaled(text_module), text_data, tmp_path / "wrong", ["tensorrt"], reference=text_module)
    meta = json.loads((tmp_path / "wrong" / "tensorrt" / "artifact.json").read_text())
    assert meta["parity"]["passed"] is False and meta["parity"]["graph"]["passed"] is False


def test_executorch_max_batch_with_a_fixed_shape_program_is_refused(text_module, text_data, tmp_path):
    with pytest.raises(RecipeError, match=r"executorch.max_batch: 8 with dynamic: false .* runs batch 1"):
        _stage(text_module, text_data, tmp_path, ["executorch"], options={"executorch": {"dynamic": False,
                                                                                         "max_batch": 8}})
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
    # The task's default dynamic: false (detection) with the recipe's max_batch: refused the same way.
    inputs, labels = text_data
    with pytest.raises(RecipeError, match="executorch.max_batch"):
        export_all(text_module, TEXT_IO, ["executorch"], tmp_path,
                   ExportConfig(targets=["executorch"], options={"executorch": {"max_batch": 4}}), inputs, labels,
                   None, META, [], defaults={"executorch": {"dynamic": False}})


@pytest.mark.parametrize("target", ["coreml", "tensorrt", "torchscript-lite"])
def test_runners_that_do_not_apply_threads_refuse_them(target, tmp_path):
    """Core ML, TensorRT and the TorchScript lite interpreter choose their own threads: threads is refused at
    load (unset, None, is fine), before anything else about the artifact is looked at."""
    ex = get_exporter(target)
    with pytest.raises(UnsupportedTargetError, match=rf"The '{target}' runner does not take threads \(got 2\)"):
        ex.load(tmp_path / "missing", threads=2)
    assert ex.applies_threads is False  # what serve and the bench read to leave threads out for it
    assert get_exporter("onnx").applies_threads and get_exporter("executorch").applies_threads


def test_the_bench_passes_threads_only_to_runners_that_apply_them():
    from edgekd.devices.worker import runtime_options

    assert runtime_options({"threads": 2}, {"exporter": "onnx"}) == {"threads": 2}
    assert runtime_options({"threads": 2}, {"exporter": "executorch"}) == {"threads": 2}
    for target in ("coreml", "tensorrt", "torchscript-lite"):
        assert runtime_options({"threads": 2}, {"exporter": target}) == {}


def test_coreml_names_its_options_and_refuses_others(tmp_path):
    with pytest.raises(UnsupportedTargetError, match="does not accept option\\(s\\) providers; allowed: compute_units"):
        get_exporter("coreml").load(tmp_path / "model.mlpackage", providers=["CPUExecutionProvider"])
