"""The TensorRT build path run for real against stand-ins of the 10.x and 11.x Python API (no GPU
here), and a scan of the code for TensorRT names deprecated in 10 or removed in 11."""

from __future__ import annotations

import io
import json
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
from trt_standins import tensorrt_10, tensorrt_11

from edgekd.errors import UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.tasks.text.task import TEXT_IO

VERSIONS = {"10": tensorrt_10, "11": tensorrt_11}


@pytest.fixture(params=sorted(VERSIONS))
def trt(request, monkeypatch):
    """``import tensorrt`` gives the stand-in of one version; a CUDA GPU is reported present."""
    module = VERSIONS[request.param]()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    import edgekd.export._tensorrt_engine as engine

    monkeypatch.setattr(engine, "cuda_ready", lambda: (True, None))
    return module


def _engine(path: Path) -> dict:
    return json.loads(path.read_bytes())


def test_fp16_engine_is_strongly_typed_from_the_fp16_graph(trt, text_module, text_data, tmp_path):
    result = get_exporter("tensorrt").export(text_module, text_data[0], TEXT_IO, tmp_path, max_batch=16,
                                             workspace_mb=256)
    assert result.built and result.path.is_file()
    built = _engine(result.path)
    assert built["version"] == trt.__version__ and built["strongly_typed"] is True
    # 10: opts in with STRONGLY_TYPED; 11: no flag (deprecated there, strong typing always on).
    assert built["network_flags"] == (1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
                                      if trt.__version__.startswith("10.") else 0)
    assert built["builder_flags"] == []  # no weakly typed precision flag
    assert built["graph"]["file"].endswith("model_fp16.onnx")
    assert "FLOAT16" in built["graph"]["initializer_types"] and "FLOAT" not in built["graph"]["initializer_types"]
    assert built["workspace"] == 256 << 20
    assert built["profiles"] == [{n: [list(s) for s in v.values()] for n, v in result.notes["profile"].items()}]
    assert result.notes["strongly_typed"] is True and result.notes["tensorrt"] == trt.__version__


def test_fp32_engine_builds_from_the_plain_graph(trt, text_module, text_data, tmp_path):
    result = get_exporter("tensorrt").export(text_module, text_data[0], TEXT_IO, tmp_path, precision="fp32")
    built = _engine(result.path)
    assert built["graph"]["file"].endswith("/model.onnx") and "FLOAT16" not in built["graph"]["initializer_types"]


def _qdq(src: Path, dst: Path, inputs: dict[str, np.ndarray], symmetric: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = [{k: v[i:i + 4] for k, v in inputs.items()} for i in range(0, 16, 4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return dst


def test_int8_engine_is_built_from_the_qdq_model(trt, text_module, text_data, tmp_path):
    inputs = text_data[0]
    ex = get_exporter("tensorrt")
    fp32 = ex.export(text_module, inputs, TEXT_IO, tmp_path / "fp32", precision="fp32")
    qdq = _qdq(tmp_path / "fp32" / "model.onnx", tmp_path / "qdq.onnx", inputs, symmetric=True)
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path / "int8", precision="int8", qdq_onnx=str(qdq))
    assert fp32.built and result.built and result.precision == "int8"
    built = _engine(result.path)
    assert built["graph"]["file"].endswith("model_int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(built["graph"]["ops"])
    assert built["builder_flags"] == [] and built["strongly_typed"] is True  # explicit quantization, no INT8 flag
    assert result.notes["qdq"]["quantize_nodes"] > 0
    assert "--onnx=model_int8.onnx" in (tmp_path / "int8" / "trtexec.sh").read_text()


def test_asymmetric_qdq_model_is_refused(text_module, text_data, tmp_path):
    inputs = text_data[0]
    ex = get_exporter("tensorrt")
    ex.export(text_module, inputs, TEXT_IO, tmp_path / "fp32", precision="fp32")
    qdq = _qdq(tmp_path / "fp32" / "model.onnx", tmp_path / "qdq.onnx", inputs, symmetric=False)
    with pytest.raises(UnsupportedTargetError, match="TensorRT quantizes symmetrically"):
        ex.export(text_module, inputs, TEXT_IO, tmp_path / "int8", precision="int8", qdq_onnx=str(qdq))


def test_parser_failure_names_the_operator(trt, tmp_path):
    import onnx
    from onnx import helper

    from edgekd.export._tensorrt_engine import build_engine

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("NonExistentOp", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedTargetError, match="cannot convert operator\\(s\\) NonExistentOp") as info:
        build_engine(tmp_path / "m.onnx", tmp_path / "model.plan", {"x": ((1,), (1,), (1,))}, 64)
    assert info.value.operator == "NonExistentOp"


def test_the_standins_fail_on_what_their_version_lacks():
    # Guards the stand-ins themselves: 11 has none of the removed names, 10 still has them.
    t10, t11 = tensorrt_10(), tensorrt_11()
    for name in ("IInt8EntropyCalibrator2",):
        assert hasattr(t10, name) and not hasattr(t11, name)
    assert hasattr(t10.BuilderFlag, "FP16") and not hasattr(t11.BuilderFlag, "FP16")
    assert not hasattr(t11.BuilderFlag, "INT8") and not hasattr(t11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    b11 = t11.Builder(t11.Logger(t11.Logger.WARNING))
    with pytest.raises(AttributeError):
        b11.platform_has_fast_fp16  # noqa: B018
    with pytest.raises(AttributeError):
        b11.create_builder_config().int8_calibrator = object()


def test_an_unsupported_tensorrt_version_is_named(monkeypatch):
    from edgekd.export._tensorrt_engine import TrtApi

    old = tensorrt_10()
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(UnsupportedTargetError, match="TensorRT 8.6.1 is installed; .* TensorRT 10 or 11.x"):
        TrtApi.load()


# Deprecated in TensorRT 10 or removed in 11 (migration guide "Removed Python APIs and Replacements";
# trtexec migration page for the flags).
REMOVED_NAMES = {
    "IInt8EntropyCalibrator2", "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator",
    "IInt8Calibrator", "int8_calibrator", "set_calibration_profile", "get_calibration_profile",
    "platform_has_fast_fp16", "platform_has_fast_int8", "EXPLICIT_BATCH", "set_quantization_flag",
    "quantization_flags", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
    "device_memory_size", "nptype", "execute_async_v2", "execute_v2", "get_binding_shape", "num_bindings",
}
REMOVED_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}  # as BuilderFlag.<name>
REMOVED_TRTEXEC = ("--fp16", "--int8", "--calib", "--best", "--bf16", "--fp8")


def test_no_deprecated_or_removed_tensorrt_name_in_the_code():
    root = Path(__file__).resolve().parents[2] / "export"
    found = []
    for path in (root / "tensorrt.py", root / "_tensorrt_engine.py"):
        toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        for i, tok in enumerate(toks):
            if tok.type == tokenize.NAME and tok.string in REMOVED_NAMES:
                found.append(f"{path.name}:{tok.start[0]} {tok.string}")
            if (tok.type == tokenize.NAME and tok.string in REMOVED_FLAGS and i >= 2
                    and toks[i - 1].string == "." and toks[i - 2].string == "BuilderFlag"):
                found.append(f"{path.name}:{tok.start[0]} BuilderFlag.{tok.string}")
            if tok.type == tokenize.STRING and any(f in tok.string for f in REMOVED_TRTEXEC):
                found.append(f"{path.name}:{tok.start[0]} {tok.string[:40]}")
    assert found == []


def test_the_scan_catches_a_removed_name(tmp_path):
    # The scan above is only worth something if it fires: the old code's calls are found.
    old = "config.set_flag(trt.BuilderFlag.FP16)\nok = builder.platform_has_fast_fp16\ncmd = ['--int8']\n"
    toks = list(tokenize.generate_tokens(io.StringIO(old).readline))
    names = {t.string for t in toks if t.type == tokenize.NAME}
    assert "platform_has_fast_fp16" in names & REMOVED_NAMES
    assert any(t.string == "FP16" and toks[i - 2].string == "BuilderFlag" for i, t in enumerate(toks))
    assert any(f in t.string for t in toks if t.type == tokenize.STRING for f in REMOVED_TRTEXEC)


def test_a_qdq_model_of_another_graph_is_refused_and_the_used_one_is_recorded(text_module, text_data, tmp_path):
    """Any file with Q/DQ nodes was copied in as model_int8.onnx and built: a stale or unrelated graph (another
    task's inputs) was recorded as this model's engine, parity not run. Its inputs and outputs must be the
    model's; the one used is recorded by sha256."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = text_data[0]
    ex = get_exporter("tensorrt")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)), str(other))
    with pytest.raises(UnsupportedTargetError, match=r"takes \['x'\] and gives \['y'\], and this model takes"):
        ex.export(text_module, inputs, TEXT_IO, tmp_path / "int8", precision="int8", qdq_onnx=str(other))

    ex.export(text_module, inputs, TEXT_IO, tmp_path / "fp32", precision="fp32")
    qdq = _qdq(tmp_path / "fp32" / "model.onnx", tmp_path / "qdq.onnx", inputs, symmetric=True)
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path / "int8", precision="int8", qdq_onnx=str(qdq))
    from edgekd.runfolder import sha256_file

    assert result.notes["qdq"]["sha256"] == sha256_file(qdq)
