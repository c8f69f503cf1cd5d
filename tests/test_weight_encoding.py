"""``quantize.unsigned_weights``: int8 weights stored as uint8 (value + 128) compute the same numbers
through ONNX Runtime's u8u8 kernels, where on an x86 CPU without VNNI the u8s8 kernel saturates its
int16 pair sums (shown here on such a CPU); ``auto`` follows the device the run is for (both forms
built, scored and timed on such a CPU when it is this machine; unsigned for another such device); the
report says what was chosen and why; impossible combinations are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_attention_pack import ops, padded, run, shipped_export  # noqa: F401  (fixtures)
from test_quantize import accuracy, bert_export, qcfg  # noqa: F401  (fixtures)

from edgekd.quantization import quantize_onnx
from edgekd.quantization import weight_encoding as we
from edgekd.quantization.onnx_methods import make_method
from edgekd.recipe import QuantizeConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

AVX2 = we.Device("x86_64", ("sse4_2", "avx", "avx2", "fma"), "an AVX2 box", False)
AVX2_HERE = AVX2._replace(words="this machine", here=True)
VNNI = we.Device("x86_64", ("avx2", "avx512f", "avx512_vnni"), "a VNNI box", False)
ARM = we.Device("aarch64", ("asimd", "asimddp"), "a phone", False)
REAL_CPU = we.this_machine  # taken at import, before conftest pins a VNNI CPU for each test


def _matmul_model(path: Path, w: np.ndarray, scale: float) -> Path:
    """x[1,K] float -> DynamicQuantizeMatMul(int8 w, one scale, no zero point) -> y[1,N]."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w.astype(np.int8), "w"), numpy_helper.from_array(np.array(scale, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def _exact(x: np.ndarray, w: np.ndarray, scale: float) -> np.ndarray:
    """What DynamicQuantizeMatMul computes, in int64: x rounded to uint8 on its own range (0 included)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    xs = (hi - lo) / 255
    zp = np.clip(np.round(-lo / xs), 0, 255)
    xq = np.clip(np.round(x / xs) + zp, 0, 255).astype(np.int64)
    return ((xq - int(zp)) @ w.astype(np.int64)) * xs * scale


def test_unsigned_weights_compute_the_exact_products_where_signed_ones_saturate(tmp_path):
    """Two large neighbouring activations (one int16 pair of the u8s8 kernel) against two weights of
    127: the unsigned file gives the exact products on every CPU; on an x86 CPU without VNNI the
    signed file's sum saturates (the reason for the setting), elsewhere it is exact too."""
    w = np.random.default_rng(0).integers(-20, 21, size=(64, 8))
    w[4:6, :3] = 127
    x = np.random.default_rng(1).normal(0, 1, size=(1, 64)).astype(np.float32)
    x[0, 4:6] = [27.0, 25.0]
    signed = _matmul_model(tmp_path / "s8.onnx", w, 0.01)
    unsigned = _matmul_model(tmp_path / "u8.onnx", w, 0.01)
    assert we.encode_unsigned(unsigned) == 1
    want = _exact(x, w, 0.01)
    np.testing.assert_allclose(run(unsigned, {"x": x}), want, rtol=1e-5, atol=1e-4)
    got = run(signed, {"x": x})
    if we.saturates(*REAL_CPU()):
        assert np.abs(got - want)[0, :3].max() > 1.0  # saturated: wrong by far more than rounding
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_the_rewrite_stores_uint8_weights_and_zero_points_plus_128(tmp_path):
    from onnx import numpy_helper

    w = np.arange(-64, 64).reshape(16, 8)
    path = _matmul_model(tmp_path / "m.onnx", w, 0.5)
    assert we.signed_weights(path) == 1
    we.encode_unsigned(path)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert inits["w"].dtype == np.uint8 and np.array_equal(inits["w"].astype(np.int16) - 128, w)
    (zp_name,) = [n for n in inits if n != "w" and n != "s"]
    assert inits[zp_name].dtype == np.uint8 and int(inits[zp_name]) == 128
    assert we.signed_weights(path) == 0 and we.encode_unsigned(path) == 0  # nothing left to rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # written beside, then renamed


def _same_integers(signed: Path, unsigned: Path) -> int:
    """Every int8 initializer of ``signed`` is the uint8 one of ``unsigned`` minus 128 (or unchanged);
    returns how many were rewritten."""
    from onnx import numpy_helper

    s8 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(signed)).graph.initializer}
    u8 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(unsigned)).graph.initializer}
    shifted = 0
    for name, a in s8.items():
        b = u8[name]
        if a.dtype == np.int8 and b.dtype == np.uint8:
            assert np.array_equal(b.astype(np.int16) - 128, a), name
            shifted += 1
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    return shifted


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_packed_int8_text_model_answers_the_same_stored_unsigned(shipped_export, tmp_path, per_channel):  # noqa: F811
    """The shipped form (QAttention, the first-token block's int8 MatMuls, 4-bit embeddings): every int8
    weight and zero point becomes the same integer + 128 in uint8, with the same operators; each text's
    logits are the signed file's where that file cannot saturate (a VNNI or ARM CPU). On an x86 CPU
    without VNNI this tiny model's scaled-up projections do saturate the signed file (its logits move by
    several hundredths), so there the unsigned file is the nearer of the two to the float model."""
    from edgekd.export.attention import pack_attention

    packed = tmp_path / "packed.onnx"
    pack_attention(shipped_export / "model.onnx", packed)
    out = {}
    for name, unsigned in (("s8", False), ("u8", True)):
        cfg = qcfg(method="dynamic", fuse="packed", per_channel=per_channel, embedding_bits=4,
                   embedding_float_rows=0, unsigned_weights=unsigned)  # the tiny vocabulary 4-bit too
        out[name] = tmp_path / f"{name}.onnx"
        make_method(cfg, None, ["input_ids", "attention_mask"], {}, tmp_path, False).quantize(packed, out[name], [])
    assert we.signed_weights(out["s8"]) > 0 and we.signed_weights(out["u8"]) == 0
    assert _same_integers(out["s8"], out["u8"]) >= 2 * we.signed_weights(out["s8"])  # weights and zero points
    assert ops(out["u8"]) == ops(out["s8"]) and ops(out["u8"]).count("QAttention") == 2
    feed = padded(seed=9)
    err = {"s8": [], "u8": []}
    for i in range(len(feed["input_ids"])):
        n = int(feed["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :n] for k, v in feed.items()}
        want = run(packed, one)
        got = {name: run(path, one) for name, path in out.items()}
        if not we.saturates(*REAL_CPU()):
            np.testing.assert_allclose(got["u8"], got["s8"], atol=1e-5, rtol=0)
        for name in got:
            err[name].append(np.abs(got[name] - want).mean())
    if we.saturates(*REAL_CPU()):
        assert np.mean(err["u8"]) < np.mean(err["s8"])


@pytest.mark.slow  # quantize_static calibrates a BERT
def test_static_qdq_weights_are_stored_unsigned_with_the_same_answers(bert_export, tmp_path):  # noqa: F811
    from test_quantize import text_inputs

    calib = text_inputs(16, seed=2)
    out = {}
    for name, unsigned in (("s8", False), ("u8", True)):
        cfg = qcfg(method="static", calibration_samples=16, unsigned_weights=unsigned)
        work = tmp_path / name
        work.mkdir()
        out[name] = tmp_path / f"{name}.onnx"
        make_method(cfg, calib, ["input_ids", "attention_mask"], {k: v.dtype for k, v in calib.items()}, work,
                    False).quantize(bert_export / "model.onnx", out[name], [])
    assert we.signed_weights(out["s8"]) > 0 and we.signed_weights(out["u8"]) == 0
    assert _same_integers(out["s8"], out["u8"]) >= we.signed_weights(out["s8"])
    feed = text_inputs(4, seed=3)
    exact = not we.saturates(*REAL_CPU())
    np.testing.assert_allclose(run(out["u8"], feed), run(out["s8"], feed), atol=1e-5 if exact else 0.05, rtol=0)


@pytest.mark.parametrize("device,kw,want,why", [
    (AVX2, {}, [True], "cannot be measured from here"),
    (AVX2_HERE, {}, [False, True], "both were scored and timed"),
    (we.Device("x86_64", ("avx2", "avx_vnni"), "an N100", False), {}, [False], "avx_vnni"),
    (VNNI, {}, [False], "avx512_vnni"),
    (we.Device("x86_64", ("avx2", "amx_int8"), "a Xeon", False), {}, [False], "amx_int8"),
    (ARM, {}, [False], "aarch64"),
    (we.Device(None, (), "a profile without arch", False), {}, [False], "unknown architecture"),
    (AVX2, {"weight_type": "quint8"}, [False], "unsigned already"),
    (AVX2, {"reduce_range": True}, [False], "7-bit"),
    (AVX2, {"method": "static", "activation_type": "qint8"}, [False], "activation_type qint8"),
    (AVX2, {"method": "fp16"}, [False], "no int8 weights"),
    (VNNI, {"unsigned_weights": True}, [True], "set in the recipe"),
    (AVX2_HERE, {"unsigned_weights": False}, [False], "set in the recipe"),
])
def test_auto_follows_the_device_and_the_weights(device, kw, want, why):
    got, reason = we.encodings(QuantizeConfig(enabled=True, **kw), device)
    assert got == want and why in reason
    if True in want and "recipe" not in reason:
        assert device.words in reason  # names the device it decided for
    assert we.settle(QuantizeConfig(enabled=True, **kw), device)[0].unsigned_weights is want[0]


@pytest.mark.parametrize("kw,match", [
    ({"weight_type": "quint8"}, "unsigned already"),
    ({"method": "fp16"}, "no int8 weights"),
    ({"method": "static", "activation_type": "qint8"}, "activation_type qint8"),
])
def test_unsigned_weights_where_they_cannot_apply_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizeConfig(enabled=True, unsigned_weights=True, **kw)


def test_the_local_profile_reads_this_machine_and_others_their_own_isa(monkeypatch):
    monkeypatch.setattr(we, "this_machine", lambda: ("x86_64", ["avx2"]))
    assert we.device_of("local") == we.Device("x86_64", ("avx2",), "this machine", True)
    box = we.device_of("x86-edge-box")
    assert box.arch == "x86_64" and "avx_vnni" in box.isa and "x86-edge-box" in box.words and not box.here
    assert we.encodings(QuantizeConfig(enabled=True), box)[0] == [False]
    assert we.encodings(QuantizeConfig(enabled=True), we.device_of("local"))[0] == [False, True]


def test_the_quantize_stage_stores_the_weights_for_the_device_and_says_why(shipped_export, tmp_path):  # noqa: F811
    """Another AVX2 device: unsigned; a VNNI device: signed; both with the same answers. This machine an
    AVX2 CPU: both built and timed, the report listing the twin."""
    val = padded(16, seed=10)
    labels = np.zeros(16, dtype=np.int64)
    reports = {}
    for name, device in (("avx2", AVX2), ("vnni", VNNI), ("here", AVX2_HERE)):
        reports[name] = quantize_onnx(shipped_export, tmp_path / name, qcfg(method="dynamic", max_accuracy_drop=1.0),
                                      None, val, labels, accuracy, device=device)
    assert we.signed_weights(tmp_path / "avx2" / "model.onnx") == 0
    assert we.signed_weights(tmp_path / "vnni" / "model.onnx") > 0
    avx2, vnni = reports["avx2"]["settings"], reports["vnni"]["settings"]
    assert avx2["unsigned_weights"] is True and "an AVX2 box" in avx2["unsigned_weights_why"]
    assert avx2["weights_stored"].startswith("uint8, value + 128")
    assert vnni["unsigned_weights"] is False and "avx512_vnni" in vnni["unsigned_weights_why"]
    assert reports["avx2"]["quantized"]["metrics"] == reports["vnni"]["quantized"]["metrics"]
    assert [c["name"] for c in reports["avx2"]["candidates"]] == ["dynamic"]
    here = reports["here"]
    assert [c["name"] for c in here["candidates"]] == ["dynamic", "dynamic/w-stored-u8"]
    assert set(here["speed_guard"]["all"]) >= {"dynamic", "dynamic/w-stored-u8"}
    chosen = next(c for c in here["candidates"] if c["chosen"])
    assert here["settings"]["unsigned_weights"] is (chosen["name"] == "dynamic/w-stored-u8")
    assert "both were scored and timed" in here["settings"]["unsigned_weights_why"]
    assert (we.signed_weights(tmp_path / "here" / "model.onnx") == 0) is here["settings"]["unsigned_weights"]


def test_a_weight_two_nodes_read_stays_signed_and_the_report_says_so(tmp_path):
    """Rewriting a shared weight would change it under the other reader: it is left signed, and the
    method's settings count it rather than claim every weight unsigned."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.quantization.onnx_methods import _encoding_settings, _store_unsigned

    w = np.arange(-32, 32).reshape(8, 8).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], [y], domain="com.microsoft")
             for y in ("y1", "y2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 8]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    stored = _store_unsigned(path, False)
    assert stored == (0, 1) and we.signed_weights(path) == 1
    settings = _encoding_settings(QuantizeConfig(enabled=True, unsigned_weights=True), stored)
    assert settings["weights_stored"].endswith("(0 weight tensors)") and settings["weights_left_signed"].startswith("1")
