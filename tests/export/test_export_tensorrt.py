"""TensorRT target: the TensorRT-ready ONNX and the exact trtexec command here; the engine where
TensorRT and a GPU are present."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from export_helpers import MAX_LENGTH, TOLERANCE, eigh_inputs, eigh_io, eigh_module

from edgekd.errors import RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.parity import check_parity
from edgekd.export.tensorrt import engine_buildable, profile_shapes, trtexec_command
from edgekd.tasks.text.task import TEXT_IO

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def trt_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    out = tmp_path_factory.mktemp("tensorrt")
    return out, get_exporter("tensorrt").export(text_module, inputs, TEXT_IO, out, max_batch=16)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the fallback taken where TensorRT is not installed")
def test_without_tensorrt_writes_onnx_and_command(trt_export):
    out, result = trt_export
    assert result.built is False
    assert result.reason == "not built: TensorRT not installed"
    assert result.path == out / "model.plan" and not result.path.exists()
    assert sorted(p.name for p in result.files) == ["model.onnx", "model_fp16.onnx", "trtexec.sh", "trtexec.txt"]
    script = (out / "trtexec.sh").read_text()
    expected = (
        "trtexec --onnx=model_fp16.onnx --saveEngine=model.plan "
        f"--minShapes=input_ids:1x1,attention_mask:1x1 --optShapes=input_ids:8x{MAX_LENGTH},attention_mask:8x{MAX_LENGTH} "
        f"--maxShapes=input_ids:16x{MAX_LENGTH},attention_mask:16x{MAX_LENGTH} --memPoolSize=workspace:4096M $STRONG"
    )
    assert expected in script
    assert os.access(out / "trtexec.sh", os.X_OK)
    assert expected.replace(" $STRONG", "") in (out / "trtexec.txt").read_text()
    assert result.precision == "fp16" and result.notes["built_from"] == "model_fp16.onnx"


def test_fp16_graph_is_converted_with_float_io(trt_export):
    import onnx

    out, result = trt_export
    model = onnx.load(str(out / "model_fp16.onnx"))
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert "FLOAT16" in types and "FLOAT" not in types  # every weight fp16: strong typing runs fp16
    assert [onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in model.graph.output] == ["FLOAT"]
    assert result.notes["fp16_converter"] in ("modelopt.onnx.autocast", "onnxruntime.transformers.float16")


def test_tensorrt_onnx_is_plain_opset_18_and_matches_source(trt_export, text_module, text_data):
    import onnx

    out, result = trt_export
    inputs, labels = text_data
    model = onnx.load(str(out / "model.onnx"))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # no ONNX Runtime-only operators
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    report = check_parity(get_exporter("onnx").load(out / "model.onnx"), text_module, inputs, labels, None, 16)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < TOLERANCE


def test_profile_shapes_follow_options():
    examples = {"input_ids": np.zeros((4, 64), np.int64), "attention_mask": np.zeros((4, 64), np.int64)}
    shapes = profile_shapes(TEXT_IO, examples, max_batch=64, opt_batch=8, max_sequence=128, opt_sequence=32)
    assert shapes["input_ids"] == ((1, 1), (8, 32), (64, 128))
    cmd = trtexec_command("model_int8.onnx", shapes, workspace_mb=512)
    assert "--maxShapes=input_ids:64x128,attention_mask:64x128" in cmd
    assert cmd[-1] == "--memPoolSize=workspace:512M"  # the Python API build's limit, for trtexec too
    assert not any(c in ("--fp16", "--int8", "--best") or c.startswith("--calib") for c in cmd)  # gone in 11


def test_int8_without_the_quantize_stage_model_is_a_recipe_error(text_module, text_data, tmp_path):
    with pytest.raises(RecipeError, match="quantize.method: static .*export.options.tensorrt.qdq_onnx"):
        get_exporter("tensorrt").export(text_module, text_data[0], TEXT_IO, tmp_path, precision="int8")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the fallback taken where TensorRT is not installed")
def test_loading_an_unbuilt_engine_says_how_to_build_it(trt_export):
    out, result = trt_export
    with pytest.raises(UnsupportedTargetError, match="trtexec.sh"):
        get_exporter("tensorrt").load(result.path)


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(UnsupportedTargetError) as info:
        get_exporter("tensorrt").export(eigh_module(), eigh_inputs(), eigh_io(), tmp_path)
    assert "'tensorrt'" in str(info.value) and "aten._linalg_eigh" in str(info.value)


def test_rejects_bad_precision(text_module, text_data, tmp_path):
    from edgekd.errors import RecipeError

    with pytest.raises(RecipeError, match="precision: 'bf8' is not one of fp16, fp32, int8"):
        get_exporter("tensorrt").export(text_module, text_data[0], TEXT_IO, tmp_path, precision="bf8")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not engine_buildable()[0], reason=f"TensorRT engine cannot be built here: {engine_buildable()[1]}")
def test_engine_builds_and_matches_source(text_module, text_data, tmp_path):
    inputs, labels = text_data
    ex = get_exporter("tensorrt")
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path, max_batch=16)
    assert result.built and result.path.is_file()
    report = check_parity(ex.load(result.path), text_module, inputs, labels, None, batch_size=16)
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff < 1e-2  # fp16 engine
