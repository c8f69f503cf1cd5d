"""The quantize stage's calibration examples and output folders: a seeded sample of the split (stratified
by label for text), recorded in the report; the folder named after the setup that wins, not the section's
method; the quantized folders a run did not write removed (an earlier method's, a Core ML mode changed, a
compression that failed), with the manifest naming only what is there; the speed guard's report saying how
each model was timed and on what inputs."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from test_quantize import OFF, accuracy, fragile_data, fragile_model, qcfg

from edgekd.errors import StageError
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.quantization import onnx_stage, quantize_onnx
from edgekd.recipe import QuantizeCandidate
from edgekd.runfolder import RunFolder
from edgekd.splits import index_sha256

pytest.importorskip("onnxruntime")


@pytest.fixture
def fragile(tmp_path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """test_quantize's two-MatMul model in a float export folder of its own, with its examples."""
    folder = fragile_model(tmp_path / "float" / "onnx")
    inputs, labels = fragile_data(folder)
    return folder, inputs, labels


# --- which examples calibrate ------------------------------------------------------------------

def _sorted_text_split(n: int = 2000):
    """A split of ``n`` examples sorted by label (the first half class 0): example i's ids are [100 + label, i]."""
    from edgekd.tasks.text.task import TokenizedSplit

    labels = np.repeat([0, 1], n // 2)
    return TokenizedSplit([[100 + int(y), 1000 + i] for i, y in enumerate(labels)], labels, 0)


def _text_ctx(split, seed: int = 13):
    from edgekd.tasks.text.context import TextRunContext

    shipped = object()
    ctx = types.SimpleNamespace(
        recipe=types.SimpleNamespace(data=types.SimpleNamespace(split=types.SimpleNamespace(seed=seed)), seed=42),
        shipped_tokenizer=shipped, tokenized=lambda name, tok=None: split if tok is shipped else None)
    ctx.calibration_data = types.MethodType(TextRunContext.calibration_data, ctx)
    return ctx


def test_text_calibration_is_a_seeded_sample_stratified_by_label_not_the_first_rows():
    split = _sorted_text_split()
    calib = _text_ctx(split).calibration_data("train", 128)
    labels, rows = calib["input_ids"][:, 0] - 100, calib["input_ids"][:, 1] - 1000
    assert len(rows) == 128 and np.bincount(labels).tolist() == [64, 64]  # the first 128 rows are all class 0
    assert not np.array_equal(rows, np.arange(128)) and np.all(np.diff(rows) > 0)
    assert calib.rows == {"split": "train", "count": 128, "of": 2000, "drawn": "seeded sample (seed 13, stratified "
                          "by label)", "rows_sha256": index_sha256(rows)}
    again = _text_ctx(split).calibration_data("train", 128)
    assert np.array_equal(again["input_ids"], calib["input_ids"])  # the same seed, the same rows
    other = _text_ctx(split, seed=14).calibration_data("train", 128)
    assert other.rows["rows_sha256"] != calib.rows["rows_sha256"]
    whole = _text_ctx(_sorted_text_split(100)).calibration_data("train", 128)  # a split no larger: all of it
    assert (whole["input_ids"][:, 1] - 1000).tolist() == list(range(100)) and whole.rows["drawn"] == "the whole split"


def test_detection_calibration_is_a_seeded_sample_not_the_first_images():
    from edgekd.tasks.detection.context import DetectionRunContext

    class Split:
        def __len__(self):
            return 300

        def collate(self, idx):
            return {"images": np.asarray(idx, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 2, 2))}

    ctx = types.SimpleNamespace(recipe=types.SimpleNamespace(seed=42), split=lambda name: Split())
    calib = DetectionRunContext.calibration_data(ctx, "train", 64)
    rows = calib["images"][:, 0, 0, 0].astype(np.int64)
    assert len(rows) == 64 and not np.array_equal(rows, np.arange(64)) and rows.max() > 200
    assert calib.rows == {"split": "train", "count": 64, "of": 300, "drawn": "seeded sample (seed 42)",
                          "rows_sha256": index_sha256(rows)}
    assert np.array_equal(DetectionRunContext.calibration_data(ctx, "train", 64)["images"], calib["images"])
    with pytest.raises(StageError, match="not 'test'"):
        DetectionRunContext.calibration_data(ctx, "test", 4)


@pytest.mark.parametrize(("quantize", "marked"), [
    ({"method": "static"}, True), ({"smooth_alpha": 0.5}, True),
    ({"method": "dynamic", "candidates": [{"method": "static"}]}, True),
    ({"method": "dynamic"}, False), ({"method": "dynamic", "embedding_bits": 4, "candidates": [{"fuse": "packed"}]},
                                     False),  # the default recipe's section: it does not calibrate
])
def test_only_a_run_that_calibrates_quantizes_again(tmp_path, monkeypatch, quantize, marked):
    """The calibration rows changed (a sample, not the first rows): a run that calibrates has a new quantize
    fingerprint (and so quantizes and benches again); one that does not keeps its fingerprint."""
    from edgekd.pipeline import create_context
    from edgekd.recipe import parse_recipe
    from edgekd.stages import quantize as stage
    from edgekd.testing import tiny_recipe, write_sentiment_csv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKD_CACHE", "cache")
    write_sentiment_csv("reviews.csv", n=60, seed=1)
    recipe = parse_recipe(tiny_recipe(".", "teacher-model", "reviews.csv", quantize={"enabled": True, **quantize},
                                      export={"targets": ["onnx"]}))
    ctx = create_context(recipe)
    hashed = []
    monkeypatch.setattr(stage, "fingerprint", lambda parts: hashed.append(parts) or "fp")
    stage.quantize_fingerprint(ctx)
    assert ("calibration_rows" in hashed[-1]) == marked


# --- the stage's folders -----------------------------------------------------------------------

def _timings(p50: dict[str, float]):
    def timing(paths, rows, runs, threads):
        return {n: {"p50_ms": p50.get(n, 1.0), "p90_ms": 1.0, "cpu_p50_ms": 1.0, "runs": runs} for n in paths}
    return timing


def _stage_ctx(root: Path, cfg, inputs=None, labels=None, targets=("onnx",), calib=None):
    """A run folder at ``root`` and a context the quantize stage reads (the fragile model's examples)."""
    run = RunFolder(root)
    run.root.mkdir(parents=True, exist_ok=True)
    calls: list[tuple[str, int]] = []

    def calibration_data(split, n):
        calls.append((split, n))
        return calib if calib is not None else dict(inputs)

    ctx = types.SimpleNamespace(
        recipe=types.SimpleNamespace(quantize=cfg, export=types.SimpleNamespace(targets=list(targets)),
                                     bench=types.SimpleNamespace(profile="local")),
        run=run, task=types.SimpleNamespace(metrics=accuracy), calibration_data=calibration_data,
        validation_data=lambda: (inputs, labels), parity_data=lambda n=None: (inputs, labels))
    return ctx, calls


def _earlier(folder: Path, **meta) -> Path:
    """An earlier run's export folder at ``folder``: a file and its artifact.json."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"earlier")
    write_artifact_meta(folder, {"target": folder.name, "exporter": "onnx", "file": "model.onnx", **meta})
    return folder


def _recorded(run: RunFolder) -> set[str]:
    """The export folders the quantize stage's record names files of (each file there, with its digest)."""
    rec = run.stage_record("quantize")
    assert all((run.root / rel).is_file() for rel in rec["artifacts"])
    return {Path(rel).parts[1] for rel in rec["artifacts"]}


@pytest.fixture
def stage(monkeypatch):
    from edgekd.stages import quantize

    monkeypatch.setattr(quantize, "quantize_fingerprint", lambda ctx: "fp")
    return quantize


def test_a_winning_candidate_ships_under_its_own_methods_name_and_earlier_quantized_folders_go(
        fragile, tmp_path, monkeypatch, stage):
    """A dynamic section with a static candidate that wins: the folder is export/onnx-int8-static (its
    artifact.json says int8-static), no export/onnx-int8 holds it, and the quantized folders of earlier runs
    (another method's, a Core ML package of a target no longer exported) are removed; the float exports and
    another family's own export (onnx-nms) stay."""
    folder, inputs, labels = fragile
    export = tmp_path / "run" / "export"
    shutil.copytree(folder, export / "onnx")
    for name in ("onnx-int8", "onnx-fp16", "coreml-palettize4", "onnx-nms", "coreml"):
        _earlier(export / name)
    monkeypatch.setattr(onnx_stage, "time_side_by_side", _timings({"float": 2.0, "dynamic": 1.0,
                                                                     "static/minmax": 0.5}))
    cfg = qcfg(max_accuracy_drop=1.0, calibration_samples=50, candidates=[QuantizeCandidate(method="static")])
    ctx, calls = _stage_ctx(tmp_path / "run", cfg, inputs, labels)
    report = stage.run_quantize(ctx)
    assert report["candidate"] == "static/minmax" and report["recommended"] == "quantized"
    out = export / "onnx-int8-static"
    assert report["out_dir"] == report["recommended_dir"] == str(out)
    meta = read_artifact_meta(out)
    assert meta["target"] == "onnx-int8-static" and meta["precision"] == "int8-static"
    assert sorted(p.name for p in export.iterdir()) == ["coreml", "onnx", "onnx-int8-static", "onnx-nms"]
    assert _recorded(ctx.run) == {"onnx-int8-static"} and calls == [("train", 50)]


def test_the_default_setup_ships_onnx_int8_without_calibrating(fragile, tmp_path, monkeypatch, stage):
    folder, inputs, labels = fragile
    export = tmp_path / "run" / "export"
    shutil.copytree(folder, export / "onnx")
    _earlier(export / "onnx-int8-static")  # an earlier static section's
    monkeypatch.setattr(onnx_stage, "time_side_by_side", _timings({"float": 2.0, "dynamic": 1.0}))
    ctx, calls = _stage_ctx(tmp_path / "run", qcfg(max_accuracy_drop=1.0), inputs, labels)
    report = stage.run_quantize(ctx)
    assert report["out_dir"] == str(export / "onnx-int8") and report["precision"] == "int8-dynamic"
    assert read_artifact_meta(export / "onnx-int8")["target"] == "onnx-int8"
    assert sorted(p.name for p in export.iterdir()) == ["onnx", "onnx-int8"]
    assert calls == [] and "calibration" not in report and _recorded(ctx.run) == {"onnx-int8"}


def test_the_report_says_which_examples_calibrated(fragile, tmp_path, monkeypatch, stage):
    from edgekd.quantization.calibration import CalibrationInputs

    folder, inputs, labels = fragile
    shutil.copytree(folder, tmp_path / "run" / "export" / "onnx")
    monkeypatch.setattr(onnx_stage, "time_side_by_side", _timings({"float": 2.0}))
    calib = CalibrationInputs(inputs)
    calib.rows = {"split": "train", "count": 200, "of": 900, "drawn": "seeded sample (seed 13)", "rows_sha256": "ab"}
    ctx, calls = _stage_ctx(tmp_path / "run", qcfg(max_accuracy_drop=1.0, smooth_alpha=0.5), inputs, labels,
                            calib=calib)
    report = stage.run_quantize(ctx)
    assert calls == [("train", 128)] and report["calibration"] == calib.rows
    assert ctx.run.stage_record("quantize")["metrics"]["calibration"] == calib.rows


def test_a_core_ml_mode_changed_or_a_compression_failed_leaves_no_earlier_package(tmp_path, monkeypatch, stage):
    """Without an ONNX export the stage compresses Core ML alone: the package of the earlier mode goes, and so
    do quantized ONNX folders whose export is gone; a compression that fails leaves no earlier package of
    its name either (it would be benched as this run's)."""
    from edgekd.quantization import coreml

    export = tmp_path / "run" / "export"
    _earlier(export / "coreml", exporter="coreml")
    for name in ("coreml-palettize4", "onnx-int8"):
        _earlier(export / name)

    def compress(src, out, cfg, test_inputs=None):
        _earlier(out, exporter="coreml", precision="int8-weights")
        return {"precision": "int8-weights"}

    monkeypatch.setattr(coreml, "quantize_coreml_folder", compress)
    ctx, _ = _stage_ctx(tmp_path / "run", qcfg(), targets=("coreml",))
    report = stage.run_quantize(ctx)
    assert set(report["targets"]) == {"coreml-linear8"}
    assert sorted(p.name for p in export.iterdir()) == ["coreml", "coreml-linear8"]
    assert _recorded(ctx.run) == {"coreml-linear8"}

    def fail(src, out, cfg, test_inputs=None):
        raise StageError("left every weight unchanged")

    monkeypatch.setattr(coreml, "quantize_coreml_folder", fail)
    report = stage.run_quantize(ctx)
    assert report["targets"]["coreml-linear8"]["written"] is False
    assert sorted(p.name for p in export.iterdir()) == ["coreml"]
    assert ctx.run.stage_record("quantize")["artifacts"] == {}


# --- what the speed guard says it timed ----------------------------------------------------------

def test_the_speed_guard_names_the_session_each_model_was_ranked_in(fragile, tmp_path):
    """The float model is timed in the session its folder ships with, the others in ONNX Runtime's default
    one: the report says so where the float folder has runtime options of its own."""
    folder, inputs, labels = fragile
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=1.0), None, inputs, labels, accuracy)
    assert report["speed_guard"]["session"] == ("ONNX Runtime's default optimisers for every model (the written "
                                                "folder's own: report session)")
    write_artifact_meta(folder, {**read_artifact_meta(folder), "runtime_options": OFF})
    guard = quantize_onnx(folder, tmp_path / "q2", qcfg(max_accuracy_drop=1.0), None, inputs, labels,
                          accuracy)["speed_guard"]
    assert guard["session"].startswith(f"the float model in the session its folder ships with (runtime_options "
                                       f"{json.dumps(OFF)}), every other model with ONNX Runtime's default")


def test_inputs_without_an_attention_mask_are_reported_without_lengths(fragile, tmp_path):
    """The fragile model's 16 features (as an image's 3 channels) are not a length: none is reported."""
    folder, inputs, labels = fragile
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=1.0), None, inputs, labels, accuracy)
    assert report["speed_guard"]["inputs"] == "5 validation examples, one at a time"


def test_lengths_are_the_attention_masks_and_only_where_there_is_one():
    from edgekd.quantization.calibration import real_length_rows

    ids = np.arange(24).reshape(3, 8) + 5
    mask = np.array([[1] * 8, [1] * 3 + [0] * 5, [1] * 5 + [0] * 3])
    rows = real_length_rows({"input_ids": ids, "attention_mask": mask})
    assert onnx_stage._timed_inputs(rows) == "3 validation examples, one at a time at their real lengths (3-8, median 5)"
    images = real_length_rows({"images": np.zeros((2, 3, 8, 8), np.float32)})
    assert onnx_stage._timed_inputs(images) == "2 validation examples, one at a time"
