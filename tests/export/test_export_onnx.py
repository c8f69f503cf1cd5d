"""ONNX target: dynamic axes, numerical parity through the runner, options, and clear failures."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import TOLERANCE, eigh_inputs, eigh_io, eigh_module, shorter, source_logits

from edgekd.errors import RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.parity import check_parity
from edgekd.tasks.text.task import TEXT_IO, classification_metrics


@pytest.fixture(scope="module")
def onnx_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    ex = get_exporter("onnx")
    return ex, ex.export(text_module, inputs, TEXT_IO, tmp_path_factory.mktemp("onnx"))


def test_graph_has_named_dynamic_batch_and_sequence_axes(onnx_export):
    import onnx

    _, result = onnx_export
    model = onnx.load(str(result.path))
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in model.graph.output] == ["logits"]
    assert result.notes["opset"] >= 18 and result.notes["external_data"] is False


def test_parity_on_every_example_and_unseen_shapes(onnx_export, text_module, text_data):
    ex, result = onnx_export
    inputs, labels = text_data
    runner = ex.load(result.path, threads=1)
    report = check_parity(runner, text_module, inputs, labels, classification_metrics, batch_size=16, target="onnx")
    assert report.examples == len(labels)
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff < TOLERANCE
    assert report.artifact_metric == pytest.approx(report.source_metric)
    for rows, length in ((1, 9), (5, 13)):  # batch and sequence the export never saw
        small = shorter(inputs, rows, length)
        got = runner.run(small)["logits"]
        assert got.shape == (rows, 2)
        np.testing.assert_allclose(got, source_logits(text_module, small), atol=TOLERANCE)


def test_runner_casts_inputs_to_declared_dtypes(onnx_export, text_data):
    ex, result = onnx_export
    inputs, _ = text_data
    runner = ex.load(result.path)
    as_int32 = {k: v[:3].astype(np.int32) for k, v in inputs.items()}
    np.testing.assert_array_equal(runner.run(as_int32)["logits"], runner.run({k: v[:3] for k, v in inputs.items()})["logits"])
    assert runner.providers == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in runner.providers


def test_runner_rejects_unknown_option_and_missing_provider(onnx_export):
    ex, result = onnx_export
    with pytest.raises(UnsupportedTargetError, match="intra_threads"):
        ex.load(result.path, intra_threads=2)
    with pytest.raises(UnsupportedTargetError, match="NoSuchExecutionProvider"):
        ex.load(result.path, providers=["NoSuchExecutionProvider"])


def test_optimize_fuses_attention_and_keeps_parity(text_module, text_data, tmp_path):
    inputs, labels = text_data
    ex = get_exporter("onnx")
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path, optimize=True)
    # Two encoder layers: both attention blocks fused into com.microsoft Attention.
    assert result.notes["ort_optimizer"]["Attention"] == 2
    assert result.notes["ort_optimizer"]["SkipLayerNormalization"] >= 2
    report = check_parity(ex.load(result.path), text_module, inputs, labels, None, batch_size=16)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < TOLERANCE


@pytest.mark.slow
def test_external_data_keeps_weights_beside_graph(text_module, text_data, tmp_path):
    inputs, labels = text_data
    ex = get_exporter("onnx")
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path, external_data=True)
    names = sorted(p.name for p in result.files)
    assert names == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    report = check_parity(ex.load(result.path), text_module, inputs, labels, None, batch_size=16)
    assert report.max_abs_diff < TOLERANCE


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(UnsupportedTargetError) as info:
        get_exporter("onnx").export(eigh_module(), eigh_inputs(), eigh_io(), tmp_path)
    msg = str(info.value)
    assert "'onnx'" in msg and "aten._linalg_eigh" in msg and "custom_translation_table" in msg
    assert info.value.operator == "aten._linalg_eigh.default"
    assert not (tmp_path / "model.onnx").exists()


def test_rejects_unknown_option_and_bad_value(text_module, text_data, tmp_path):
    inputs, _ = text_data
    ex = get_exporter("onnx")
    with pytest.raises(UnsupportedTargetError, match=r"does not accept option\(s\) optimise; allowed: external_data, opset, optimize"):
        ex.export(text_module, inputs, TEXT_IO, tmp_path, optimise=True)
    with pytest.raises(RecipeError, match=r"export.options.onnx.optimize: expected bool"):
        ex.export(text_module, inputs, TEXT_IO, tmp_path, optimize="yes")
    with pytest.raises(RecipeError, match=r"export.options.onnx.opset: must be at least 18"):
        ex.export(text_module, inputs, TEXT_IO, tmp_path, opset=13)
