"""Activation smoothing before int8 (quantize.smooth_alpha): the float model is unchanged, the scales
are the documented ones, one Mul per smoothed input, and an outlier channel costs int8 less."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_quantize import accuracy, fragile, qcfg  # noqa: F401, F811  (fixtures)

from edgekd.errors import StageError
from edgekd.quantization import quantize_onnx
from edgekd.quantization.onnx_stage import candidate_configs
from edgekd.recipe import QuantizeCandidate, QuantizeConfig
from edgekd.stages.quantize import quantize_settings

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgekd.quantization.smooth import smooth_file  # noqa: E402

OUTLIER = 5  # the input channel forty times larger than the others


def outlier_model(path: Path, shared_weight: bool = False) -> Path:
    """x[N,16] -> MatMul a (wa) and MatMul b (wb), both reading x -> Add -> Relu -> MatMul out (wo).
    With ``shared_weight``, b reads wa too (the weight of two nodes: not smoothed)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "wo")]
    if not shared_weight:
        inits.append(numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "wb"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
         helper.make_node("MatMul", ["x", "wa" if shared_weight else "wb"], ["b"], name="mm_b"),
         helper.make_node("Add", ["a", "b"], ["ab"], name="add"),
         helper.make_node("Relu", ["ab"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "wo"], ["logits"], name="mm_out")],
        "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def outlier_rows(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).normal(size=(n, 1, 16)).astype(np.float32)
    x[..., OUTLIER] *= 40
    return [{"x": r} for r in x]


def run(path: Path, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, r)[0] for r in rows])


def test_smoothing_keeps_the_float_model_and_applies_the_documented_scales(tmp_path):
    src = outlier_model(tmp_path / "m.onnx")
    calib = outlier_rows(64, seed=1)
    report = smooth_file(src, tmp_path / "s.onnx", calib, alpha=0.5)
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    muls = [n for n in graph.node if n.op_type == "Mul"]
    # x feeds mm_a and mm_b (one Mul, one s for both), h feeds mm_out (its own)
    assert len(muls) == 2 and {r["input"] for r in report["inputs"]} == {"x", "h"}
    (by_x,) = [r for r in report["inputs"] if r["input"] == "x"]
    assert sorted(by_x["nodes"]) == ["mm_a", "mm_b"]
    nodes = {n.name: n for n in graph.node}
    assert nodes["mm_a"].input[0] == nodes["mm_b"].input[0] == next(m.output[0] for m in muls if m.input[0] == "x")

    src_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    xmax = np.abs(np.concatenate([r["x"] for r in calib])).reshape(-1, 16).max(axis=0)
    wmax = np.maximum(np.abs(src_inits["wa"]).max(axis=1), np.abs(src_inits["wb"]).max(axis=1))
    s = np.sqrt(xmax) / np.sqrt(wmax)
    np.testing.assert_allclose(inits["wa"], src_inits["wa"] * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(inits["wb"], src_inits["wb"] * s[:, None], rtol=1e-5)
    inv = next(m.input[1] for m in muls if m.input[0] == "x")
    np.testing.assert_allclose(inits[inv], 1 / s, rtol=1e-5)
    assert s[OUTLIER] > 4 * np.median(s)  # the outlier channel is the one divided most

    held_out = outlier_rows(50, seed=2)
    np.testing.assert_allclose(run(tmp_path / "s.onnx", held_out), run(src, held_out), rtol=1e-4, atol=1e-4)


def test_smoothing_cuts_the_int8_error_of_an_outlier_channel(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = outlier_model(tmp_path / "m.onnx")
    smooth_file(src, tmp_path / "s.onnx", outlier_rows(64, seed=1), alpha=0.5)
    held_out = outlier_rows(200, seed=2)
    ref = run(src, held_out)
    err = {}
    for name in ("m", "s"):
        quantize_dynamic(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}-int8.onnx"),
                         weight_type=QuantType.QInt8)
        err[name] = float(np.abs(run(tmp_path / f"{name}-int8.onnx", held_out) - ref).mean())
    assert err["s"] < 0.7 * err["m"], err  # 0.34 against 0.59 here


def test_smoothing_leaves_a_shared_weight_and_refuses_what_it_cannot_do(tmp_path):
    src = outlier_model(tmp_path / "m.onnx", shared_weight=True)
    report = smooth_file(src, tmp_path / "s.onnx", outlier_rows(8, seed=1), alpha=0.5)
    assert [r["input"] for r in report["inputs"]] == ["h"]  # wa is read by two nodes: x is not smoothed
    for alpha in (0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            smooth_file(src, tmp_path / "s.onnx", outlier_rows(8, seed=1), alpha=alpha)
    with pytest.raises(ValueError, match="calibration inputs"):
        smooth_file(src, tmp_path / "s.onnx", [], alpha=0.5)
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(relu, str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match="no MatMul"):
        smooth_file(tmp_path / "relu.onnx", tmp_path / "s.onnx", [{"x": np.ones((1, 4), np.float32)}], alpha=0.5)


def test_quantize_stage_smooths_with_calibration_inputs_and_says_so(fragile, tmp_path):  # noqa: F811
    folder, inputs, labels = fragile
    cfg = qcfg(smooth_alpha=0.5, calibration_samples=40, max_accuracy_drop=1.0)
    report = quantize_onnx(folder, tmp_path / "q", cfg, inputs, inputs, labels, accuracy)
    assert report["candidate"] == "dynamic/smooth0.5"
    assert report["smoothing"]["alpha"] == 0.5 and report["smoothing"]["calibration_examples"] == 40
    assert report["smoothing"]["parity"]["top1_agreement"] == 1.0
    written = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    muls = [n for n in written.node if n.op_type == "Mul" and n.name.startswith("edgekd_smooth_")]
    assert len(muls) == len(report["smoothing"]["inputs"]) == 2
    with pytest.raises(StageError, match="calibrates the channel ranges"):
        quantize_onnx(folder, tmp_path / "q2", cfg, None, inputs, labels, accuracy)


def test_smooth_alpha_in_the_recipe():
    with pytest.raises(ValueError, match="fp16 has none to narrow"):
        QuantizeConfig(method="fp16", smooth_alpha=0.5)
    with pytest.raises(ValueError):
        QuantizeConfig(smooth_alpha=0)
    assert "smooth_alpha" not in quantize_settings(QuantizeConfig())  # runs recorded before it stay valid
    assert quantize_settings(QuantizeConfig(smooth_alpha=0.5))["smooth_alpha"] == 0.5
    cfg = QuantizeConfig(candidates=[QuantizeCandidate(smooth_alpha=0.75)])
    assert [n for n, _ in candidate_configs(cfg)] == ["dynamic", "dynamic/smooth0.75"]
    assert "smooth_alpha" not in quantize_settings(QuantizeConfig(candidates=[{"fuse": "packed"}]))["candidates"][0]


def test_the_prune_search_times_the_smoothed_form(fragile, tmp_path):  # noqa: F811
    """The search's latency is taken on the model the quantize section writes: smoothing included."""
    from edgekd.stages.prune_common import _quantize_for_timing

    folder, inputs, _ = fragile
    plain = _quantize_for_timing(qcfg(), folder / "model.onnx", tmp_path / "plain", inputs)
    smoothed = _quantize_for_timing(qcfg(smooth_alpha=0.5), folder / "model.onnx", tmp_path / "smooth", inputs)

    def smooth_muls(path):
        return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Mul" and "smooth" in n.name]

    assert smooth_muls(plain) == [] and len(smooth_muls(smoothed)) == 2


def test_a_search_redoes_the_prune_stage_when_its_timed_form_changes():
    """A prune search's latencies come from the quantize section's form (smoothing included), so that
    section's shape is in the prune fingerprint; without a search it is not (recorded runs stay valid)."""
    from edgekd.recipe import load_recipe
    from edgekd.stages.prune_common import search_timing_settings

    plain = load_recipe("default")
    assert search_timing_settings(plain) == {}
    assert search_timing_settings(load_recipe("default", ["quantize.smooth_alpha=0.5"])) == {}
    search = load_recipe("default", ["prune.keep_params=null", "prune.max_accuracy_drop=0.005"])
    smoothed = load_recipe("default", ["prune.keep_params=null", "prune.max_accuracy_drop=0.005", "quantize.smooth_alpha=0.5"])
    assert search_timing_settings(search)["timed_as"]["smooth_alpha"] is None
    assert search_timing_settings(smoothed)["timed_as"]["smooth_alpha"] == 0.5
    guard_only = load_recipe("default", ["prune.keep_params=null", "prune.max_accuracy_drop=0.005", "quantize.max_accuracy_drop=0.02"])
    assert search_timing_settings(guard_only) == search_timing_settings(search)  # the guard does not shape it
