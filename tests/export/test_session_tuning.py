"""An ONNX export folder's session options: whether its sessions leave out ONNX Runtime's
SkipLayerNormFusion is measured on validation rows (``tune_session``), recorded in artifact.json
(``runtime_options``, ``session_tuning``) and applied by every runner that opens the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import UnsupportedTargetError
from edgekd.export import timing
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.export.stage import artifact_digest, load_artifact

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

OFF = {"disabled_optimizers": ["SkipLayerNormFusion"]}


def residual_layernorm(folder: Path, with_layernorm: bool = True) -> Path:
    """x, r [1, S, 8] -> Add -> LayerNormalization -> y: the pair ONNX Runtime fuses into SkipLayerNormalization
    (without ``with_layernorm``: Add -> Relu, nothing to fuse)."""
    from onnx import TensorProto, helper, numpy_helper

    last = (helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-5) if with_layernorm
            else helper.make_node("Relu", ["s"], ["y"]))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "r"], ["s"]), last], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "seq", 8]) for n in ("x", "r")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 8])],
        [numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "g"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def write_folder(folder: Path, **extra) -> Path:
    path = residual_layernorm(folder)
    write_artifact_meta(folder, {"target": "onnx", "exporter": "onnx", "file": "model.onnx",
                                 "sha256": artifact_digest(path), "precision": "fp32",
                                 "io": {"input_names": ["x", "r"], "output_names": ["y"]}, **extra})
    return path


def rows(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{k: rng.normal(size=(1, 3 + i, 8)).astype(np.float32) for k in ("x", "r")} for i in range(n)]


def optimized_ops(path: Path, tmp_path: Path, **kwargs) -> set[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kwargs)
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def test_the_optimiser_name_edgekd_disables_is_the_one_onnx_runtime_fuses_with(tmp_path):
    """ONNX Runtime ignores unknown names in disabled_optimizers: if SkipLayerNormFusion were renamed,
    the folder's option would do nothing. Its optimised graph shows the fusion on and off."""
    path = residual_layernorm(tmp_path / "m")
    assert "SkipLayerNormalization" in optimized_ops(path, tmp_path)
    ops = optimized_ops(path, tmp_path, disabled_optimizers=OFF["disabled_optimizers"])
    assert "SkipLayerNormalization" not in ops and {"Add", "LayerNormalization"} <= ops


class RecordingSession:
    """ONNX Runtime's session, recording the keyword options each was opened with."""

    opened: list[dict] = []
    paths: list[str] = []

    def __new__(cls, path, so=None, providers=None, **kwargs):
        cls.opened.append(kwargs)
        cls.paths.append(Path(path).name)
        return _REAL_SESSION(path, so, providers=providers, **kwargs)


_REAL_SESSION = ort.InferenceSession


def test_load_artifact_opens_the_session_the_folder_records_and_the_caller_can_override(tmp_path, monkeypatch):
    write_folder(tmp_path / "tuned", runtime_options=OFF)
    write_folder(tmp_path / "plain")
    RecordingSession.opened = []
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    runner, _ = load_artifact(tmp_path / "tuned")
    assert runner.disabled_optimizers == ["SkipLayerNormFusion"]
    assert RecordingSession.opened[-1]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    feed = rows(1)[0]
    tuned = runner.run(feed)["y"]
    plain, _ = load_artifact(tmp_path / "plain")
    assert plain.disabled_optimizers == [] and RecordingSession.opened[-1]["disabled_optimizers"] is None
    np.testing.assert_allclose(tuned, plain.run(feed)["y"], atol=1e-5)  # same answers, another kernel
    override, _ = load_artifact(tmp_path / "tuned", disabled_optimizers=[])
    assert override.disabled_optimizers == [] and RecordingSession.opened[-1]["disabled_optimizers"] is None


def test_an_optimiser_name_edgekd_does_not_measure_is_refused(tmp_path):
    from edgekd.devices.remote_runner import load_standalone

    write_folder(tmp_path / "bad", runtime_options={"disabled_optimizers": ["SkipLayerNormFuse"]})
    with pytest.raises(UnsupportedTargetError, match="SkipLayerNormFuse.*ignore an unknown name"):
        load_artifact(tmp_path / "bad")
    meta = read_artifact_meta(tmp_path / "bad")
    with pytest.raises(ValueError, match="SkipLayerNormFuse"):
        load_standalone(tmp_path / "bad", meta, 1, None)
    meta["runtime_options"] = {"graph_optimization_level": 0}
    with pytest.raises(ValueError, match="graph_optimization_level"):
        load_standalone(tmp_path / "bad", meta, 1, None)


def test_the_standalone_device_runner_applies_the_folders_options(tmp_path):
    from edgekd.devices.remote_runner import load_standalone

    write_folder(tmp_path / "tuned", runtime_options=OFF)
    runner = load_standalone(tmp_path / "tuned", read_artifact_meta(tmp_path / "tuned"), 1, None)
    assert runner.runtime["disabled_optimizers"] == ["SkipLayerNormFusion"]
    write_folder(tmp_path / "plain")
    assert load_standalone(tmp_path / "plain", read_artifact_meta(tmp_path / "plain"), 1, None
                           ).runtime["disabled_optimizers"] == []


@pytest.mark.parametrize(("default_ms", "off_ms", "kept"), [(1.0, 0.5, OFF), (1.0, 0.98, {}), (1.0, 1.2, {})])
def test_tune_session_keeps_the_unfused_session_only_when_it_is_faster_by_the_margin(
        tmp_path, monkeypatch, default_ms, off_ms, kept):
    path = residual_layernorm(tmp_path / "m")
    seen = {}

    def fake(paths, inputs, runs, threads):
        seen.update(paths=paths, rows=len(inputs), runs=runs)
        return {"default": {"p50_ms": default_ms}, "SkipLayerNormFusion off": {"p50_ms": off_ms}}

    monkeypatch.setattr(timing, "time_side_by_side", fake)
    out = timing.tune_session(path, rows(3), 40, 1)
    assert out["runtime_options"] == kept
    assert seen["paths"] == {"default": path, "SkipLayerNormFusion off": (path, OFF)}
    assert seen["rows"] == 3 and seen["runs"] == 40
    assert out["tuning"]["p50_ms"] == {"default": default_ms, "SkipLayerNormFusion off": off_ms}
    assert out["tuning"]["chosen"] == ("SkipLayerNormFusion off" if kept else "default")


def test_a_graph_without_the_pattern_is_not_timed(tmp_path, monkeypatch):
    path = residual_layernorm(tmp_path / "m", with_layernorm=False)
    monkeypatch.setattr(timing, "time_side_by_side", lambda *a, **k: pytest.fail("timed a graph with nothing to fuse"))
    out = timing.tune_session(path, rows(), 10, 1)
    assert out == {"runtime_options": {}, "tuning": {"timed": False, "reason": "no Add -> LayerNormalization pair to fuse"}}


def test_tune_session_times_both_sessions_for_real(tmp_path):
    out = timing.tune_session(residual_layernorm(tmp_path / "m"), rows(), 20, 1)
    assert out["tuning"]["timed"] and set(out["tuning"]["p50_ms"]) == {"default", "SkipLayerNormFusion off"}
    assert all(v > 0 for v in out["tuning"]["p50_ms"].values())
    assert out["runtime_options"] in ({}, OFF)


def test_the_export_stage_tunes_the_onnx_folder_on_the_timing_inputs_before_parity(
        text_module, text_data, tokenizer_files, tmp_path, monkeypatch):
    from edgekd.export.stage import export_all
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.text.task import TEXT_IO, classification_metrics

    inputs, labels = text_data
    timing_inputs = {k: v[:6] for k, v in inputs.items()}
    timed = []

    def tune(path, rows, runs, threads):
        timed.append((Path(path).name, [r["input_ids"].shape[1] for r in rows], (Path(path).parent / "model.onnx").exists()))
        return {"runtime_options": dict(OFF), "tuning": {"timed": True, "chosen": "SkipLayerNormFusion off"}}

    monkeypatch.setattr(timing, "tune_session", tune)
    RecordingSession.opened, RecordingSession.paths = [], []
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    records = export_all(text_module, TEXT_IO, ["onnx", "torchscript-lite"], tmp_path, ExportConfig(targets=["onnx", "torchscript-lite"]),
                         inputs, labels, classification_metrics, {"labels": ["negative", "positive"]}, tokenizer_files,
                         timing_inputs=timing_inputs)
    # Only the ONNX target is tuned, on the timing inputs one by one at their real lengths.
    mask = timing_inputs["attention_mask"]
    assert timed == [("model.onnx", [int(m.sum()) for m in mask], True)]
    meta = read_artifact_meta(tmp_path / "onnx")
    assert meta["runtime_options"] == OFF and meta["session_tuning"]["chosen"] == "SkipLayerNormFusion off"
    assert "runtime_options" not in read_artifact_meta(tmp_path / "torchscript-lite")
    # The choice is in the graph too: its residual Adds are Sum, so a plain session runs it unfused; the
    # rewritten file answered the timing rows in a default session (the one session opened without the
    # option, on the rewritten copy) exactly as the tuned session on the original.
    written = tmp_path / "onnx" / "model.onnx"
    assert not timing.has_skip_layernorm_pattern(written) and meta["sha256"] == artifact_digest(written)
    n = meta["session_tuning"]["residual_adds_as_sum"]
    assert n > 0 and [n.op_type for n in onnx.load(str(written)).graph.node].count("Sum") == n
    plain = [p for p, o in zip(RecordingSession.paths, RecordingSession.opened, strict=True)
             if o["disabled_optimizers"] is None]
    assert plain == ["model.sum.onnx"]
    # Parity opened the folder the way it will be served: without the fusion.
    assert records["onnx"]["parity"]["passed"]
    assert RecordingSession.opened.count({"disabled_optimizers": ["SkipLayerNormFusion"]}) >= 2


def test_residual_adds_written_as_sum_run_unfused_in_any_session_with_the_same_answers(tmp_path):
    """``write_residual_adds_as_sum``: the Add feeding a LayerNormalization becomes Sum, so ONNX
    Runtime's default session (no artifact.json read) has no SkipLayerNormalization to fuse, and
    answers to the bit as the original file under the folder's options; nothing else is touched."""
    original = residual_layernorm(tmp_path / "a")
    rewritten = residual_layernorm(tmp_path / "b")
    assert "SkipLayerNormalization" in optimized_ops(original, tmp_path)
    assert timing.write_residual_adds_as_sum(rewritten) == 1
    assert [n.op_type for n in onnx.load(str(rewritten)).graph.node] == ["Sum", "LayerNormalization"]
    assert not timing.has_skip_layernorm_pattern(rewritten)
    assert "SkipLayerNormalization" not in optimized_ops(rewritten, tmp_path)
    for feed in rows():
        want = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"], **OFF).run(None, feed)[0]
        got = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        np.testing.assert_array_equal(got, want)
    relu = residual_layernorm(tmp_path / "c", with_layernorm=False)
    before = relu.read_bytes()
    assert timing.write_residual_adds_as_sum(relu) == 0 and relu.read_bytes() == before


def test_a_model_with_external_weights_is_not_rewritten_as_sum(tmp_path):
    path = residual_layernorm(tmp_path / "ext")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="external data files: not rewritten"):
        timing.write_residual_adds_as_sum(path)
    assert path.read_bytes() == before


def test_the_unfused_rewrite_is_kept_only_with_the_tuned_sessions_answers(tmp_path, monkeypatch):
    """``unfuse_in_file``: nothing to do for a folder on the default session; a rewrite whose default
    session answers otherwise than the tuned one is undone and says so; the inverse
    (``write_residual_sums_as_adds``) gives back the graph as exported."""
    path = residual_layernorm(tmp_path / "m")
    original = path.read_bytes()
    assert timing.unfuse_in_file(path, rows(), {}) == "not rewritten: the folder keeps ONNX Runtime's default session"
    real = timing.write_residual_adds_as_sum

    def skewed(p, dst=None):  # the rewrite also moves the LayerNorm's epsilon: answers differ
        n = real(p, dst)
        model = onnx.load(str(dst or p))
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "epsilon":
                    a.f = 0.5
        onnx.save(model, str(dst or p))
        return n

    monkeypatch.setattr(timing, "write_residual_adds_as_sum", skewed)
    assert timing.unfuse_in_file(path, rows(), OFF) == ("not rewritten: ONNX Runtime's default session did not "
                                                        "answer as the tuned one")
    assert path.read_bytes() == original and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    monkeypatch.setattr(timing, "write_residual_adds_as_sum", real)
    assert timing.unfuse_in_file(path, rows(), OFF) == 1 and not timing.has_skip_layernorm_pattern(path)
    restored = tmp_path / "restored.onnx"
    assert timing.write_residual_sums_as_adds(path, restored) == 1
    assert onnx.load(str(restored)) == onnx.load_from_string(original)
    assert timing.write_residual_sums_as_adds(restored, tmp_path / "again.onnx") == 0
    assert not (tmp_path / "again.onnx").exists()
