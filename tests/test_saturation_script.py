"""benchmarks/saturation.py: an int8 folder against its unsigned twin (the same integers + 128, in uint8),
on the splits given, with the real CPU's answer to whether its u8s8 kernel can saturate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_attention_pack import run
from test_weight_encoding import REAL_CPU, _exact, _matmul_model

from edgekd.errors import EdgeKDError
from edgekd.quantization import weight_encoding as we
from edgekd.tasks.text.task import classification_metrics

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCALE = 0.01


def _metrics(outputs, labels):
    """The text task's metrics, read from the toy model's output ``y``."""
    return classification_metrics({"logits": outputs["y"]}, labels)


@pytest.fixture
def saturation(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(we, "this_machine", REAL_CPU)  # the script reports the CPU it runs on
    import saturation

    return saturation


def _folder(root: Path, w: np.ndarray, precision: str = "int8-dynamic") -> Path:
    root.mkdir()
    _matmul_model(root / "model.onnx", w, SCALE)
    (root / "artifact.json").write_text(json.dumps({"file": "model.onnx", "precision": precision,
                                                    "runtime_options": {}}))
    return root


def _float_reference(path: Path, w: np.ndarray) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array((w * SCALE).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_figures_are_the_two_files_outputs_and_the_cpu_decides_which_is_wrong(saturation, tmp_path):
    """Rows whose neighbouring activations are large meet weights of 127: the unsigned twin computes the
    exact products; on a CPU without VNNI the signed file's sums saturate there, elsewhere the two agree."""
    rng = np.random.default_rng(0)
    w = rng.integers(-20, 21, size=(64, 8))
    w[4:6, :3] = 127
    x = rng.normal(0, 1, size=(12, 64)).astype(np.float32)
    x[::2, 4:6] = [27.0, 25.0]  # every other row can saturate
    labels = np.array([int(np.argmax(_exact(x[i:i + 1], w, SCALE))) for i in range(len(x))])
    folder = _folder(tmp_path / "onnx-int8", w)
    reference = _float_reference(tmp_path / "float.onnx", w)

    result = saturation.measure(folder, {"test": ({"x": x}, labels)}, _metrics, 1, None, tmp_path, reference)

    assert result["weights_rewritten"] == 1 and result["weights_left_signed"] == 0
    signed = np.concatenate([run(folder / "model.onnx", {"x": x[i:i + 1]}) for i in range(len(x))])
    twin = np.concatenate([run(tmp_path / "unsigned.onnx", {"x": x[i:i + 1]}) for i in range(len(x))])
    exact = np.concatenate([_exact(x[i:i + 1], w, SCALE) for i in range(len(x))])
    np.testing.assert_allclose(twin, exact, rtol=1e-5, atol=1e-4)  # the twin is the exact model
    row = result["splits"]["test"]
    assert row["texts"] == 12
    assert row["max_logit_diff"] == pytest.approx(float(np.abs(signed - twin).max()))
    assert row["answers_changed"] == int((signed.argmax(1) != twin.argmax(1)).sum())
    assert row["unsigned_accuracy"] == 1.0  # labels are the exact model's answers
    assert row["signed_accuracy"] == pytest.approx(float((signed.argmax(1) == labels).mean()))
    assert row["unsigned_error_vs_float"] < 0.05  # only the activations' rounding
    assert result["timing"]["texts"] == 12 and set(result["timing"]["p50_ms"]) == {"signed", "unsigned"}
    if we.saturates(*REAL_CPU()):
        differing = np.abs(signed - twin).max(1) > 0
        assert result["cpu"]["can_saturate"] and row["max_logit_diff"] > 1.0
        assert row["texts_differing"] == int(differing.sum()) and differing[::2].all()  # the large pairs saturate
        assert row["signed_error_vs_float"] > row["unsigned_error_vs_float"]
    else:
        assert not result["cpu"]["can_saturate"] and row["max_logit_diff"] == 0.0
    assert saturation.check(result) is None
    assert "| test | 12 |" in saturation.table(result)


def test_a_difference_on_a_cpu_that_cannot_saturate_fails_the_check(saturation):
    result = {"cpu": {"arch": "x86_64", "isa": ["avx512_vnni"], "can_saturate": False},
              "splits": {"test": {"max_logit_diff": 1e-7}, "validation": {"max_logit_diff": 0.25}}}
    assert "the unsigned rewrite changed the model" in saturation.check(result)
    assert "validation" in saturation.check(result) and "'test'" not in saturation.check(result)  # float rounding
    result["splits"]["validation"]["max_logit_diff"] = 2e-6
    assert saturation.check(result) is None
    result["splits"]["validation"]["max_logit_diff"] = 0.25
    result["cpu"]["can_saturate"] = True
    assert saturation.check(result) is None


def test_a_folder_without_int8_weights_is_refused(saturation, tmp_path):
    from onnx import numpy_helper

    folder = _folder(tmp_path / "onnx", np.ones((4, 2)), precision="fp32")
    model = onnx.load(str(folder / "model.onnx"))
    for t in model.graph.initializer:
        if t.name == "w":
            t.CopyFrom(numpy_helper.from_array(np.ones((4, 2), np.float32), "w"))
    model.graph.node[0].op_type, model.graph.node[0].domain = "MatMul", ""
    del model.graph.node[0].input[2:]
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(EdgeKDError, match="no int8 weight an integer operator multiplies .*--artifact"):
        saturation.measure(folder, {"test": ({"x": np.ones((1, 4), np.float32)}, np.zeros(1))}, _metrics, 1, None,
                           tmp_path)


def test_the_command_refuses_a_folder_that_is_not_an_export(saturation, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(SystemExit, match="has no artifact.json: give an export folder"):
        saturation.main([str(run_dir), "--artifact", "onnx-int8"])


def test_the_command_refuses_a_run_that_is_not_a_classifier(saturation, tmp_path):
    """Logits and answers are a classifier's figures: a detection run is refused, not scored by argmax."""
    import shutil

    import edgekd

    run_dir = tmp_path / "det"
    (run_dir / "export").mkdir(parents=True)
    _folder(run_dir / "export" / "onnx-int8", np.ones((4, 2)))
    shutil.copyfile(Path(edgekd.__file__).parent / "recipes" / "detect-default.yaml", run_dir / "recipe.yaml")
    with pytest.raises(SystemExit, match="task 'detection'.*give a text-classification run"):
        saturation.main([str(run_dir), "--artifact", "onnx-int8"])
