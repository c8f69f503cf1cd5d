"""detection.conf_threshold, iou_threshold and max_det are the exports' post-processing: recorded in
artifact.json, used by export parity, and hashed into the export stage's fingerprint with
detection.nms_in_graph; export/onnx-nms follows the export stage's rule for a target it could not
export (an earlier run's folder is not left to be served or benched as if current)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.errors import ParityError, UnsupportedTargetError
from edgekd.pipeline import create_context, fingerprint_of
from edgekd.recipe import load_recipe, parse_recipe
from edgekd.runfolder import fingerprint
from edgekd.testing import tiny_detector_config, tiny_recipe, write_sentiment_csv

KEYS = {"conf_threshold": 0.4, "iou_threshold": 0.5, "max_det": 50, "nms_in_graph": True}


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _detection_recipe(output_dir="runs", **detection):
    data = load_recipe("detect-default").model_dump(mode="json")
    data.update(name="tiny-det", output_dir=str(output_dir))
    data["detection"].update(image_size=64, synthetic={"train": 4, "validation": 2, "test": 3, "max_objects": 2,
                                                       "seed": 1}, **detection)
    # An untrained detector's near-tied boxes come out of NMS in another order on each runtime: no
    # parity thresholds, except where a test sets one.
    data["export"].update(targets=["onnx"], parity_examples=3, parity_batch_size=3, min_top1_agreement=None,
                          max_abs_diff=None)
    return data


def _context(output_dir="runs", export=None, **detection):
    data = _detection_recipe(output_dir, **detection)
    data["export"].update(export or {})
    return create_context(parse_recipe(data))


def test_the_export_fingerprint_covers_every_detection_key_the_export_reads(here):
    base = fingerprint_of(_context(), "export")
    seen = {base}
    for key, value in KEYS.items():
        got = fingerprint_of(_context(**{key: value}), "export")
        assert got not in seen, key  # each key, alone, gives its own fingerprint
        seen.add(got)
        for stage in ("quantize", "bench"):  # and what is built on the exports follows
            assert fingerprint_of(_context(**{key: value}), stage) != fingerprint_of(_context(), stage), (key, stage)
    # A key at the value every earlier export behaved by leaves the fingerprint as it was (those run
    # folders keep their exports: served without a recorded postprocess, they answer with these values).
    assert _context().export_settings == {}
    assert fingerprint_of(_context(conf_threshold=0.25, iou_threshold=0.6, max_det=100, nms_in_graph=False),
                          "export") == base


def test_a_text_recipe_keeps_its_export_fingerprint(here):
    from edgekd.stages.export import _source_fingerprint

    write_sentiment_csv("reviews.csv", n=60, seed=1)
    data = tiny_recipe(".", "teacher-model", "reviews.csv", export={"targets": ["onnx", "torchscript-lite"]})
    data["output_dir"] = "runs"
    ctx = create_context(parse_recipe(data))
    assert getattr(ctx, "export_settings", None) is None
    export = ctx.recipe.export.model_dump(mode="json")
    # The fingerprint as it was computed before the detection keys were hashed.
    before = fingerprint({"export": export, "source": _source_fingerprint(ctx), "data": ctx.data_fingerprint})
    assert fingerprint_of(ctx, "export") == before


def _outputs(best_disagreeing: float):
    """Two models' raw outputs on one image, 11 locations: locations 0-9 agree (score 0.9, as many as box
    agreement compares at least, so the threshold alone decides what else is); location 10 picks another class
    on each side, at score ``best_disagreeing``."""
    boxes = np.array([[[20 * i, 0, 20 * i + 10, 10] for i in range(11)]], np.float32)
    got = np.array([[[0.9, 0.0]] * 10 + [[best_disagreeing, 0.0]]], np.float32)
    want = np.array([[[0.9, 0.0]] * 10 + [[0.0, best_disagreeing]]], np.float32)
    return {"boxes": boxes, "scores": got}, {"boxes": boxes, "scores": want}


def test_the_recipe_postprocess_reaches_parity_and_artifact_meta(here):
    ctx = _context(conf_threshold=0.4, iou_threshold=0.5, max_det=50)
    got, want = _outputs(0.3)
    # The disagreeing location scores 0.3: below the recipe's 0.4 it is not compared.
    assert ctx.task.agreement(got, want) == 1.0
    assert _context(conf_threshold=0.2).task.agreement(got, want) == pytest.approx(10 / 11)
    assert ctx.task.export_meta()["postprocess"] == {"conf_threshold": 0.4, "iou_threshold": 0.5, "max_det": 50}


def test_serving_defaults_of_an_export_without_postprocess_are_the_legacy_ones():
    from edgekd.serving.schemas import MAX_DET_LIMIT, DetectOptions
    from edgekd.tasks.detection.settings import DetectionConfig
    from edgekd.tasks.detection.task import LEGACY_POSTPROCESS

    assert DetectOptions().model_dump() == LEGACY_POSTPROCESS
    limit = [m.le for m in DetectionConfig.model_fields["max_det"].metadata if getattr(m, "le", None)]
    assert limit == [MAX_DET_LIMIT]  # a recorded max_det is one a request may give


def _nms_export(ctx):
    from edgekd.tasks.detection.models import build_detector

    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(), len(ctx.task.label_names), 64).eval()
    with torch.no_grad():  # untrained heads give tied scores; spread them so there are detections
        for branch in model.head.cls:
            branch[-1].bias.uniform_(-3, 3)
    inputs, labels = ctx.parity_data(ctx.recipe.export.parity_examples)
    meta = {"task": ctx.task.name, "labels": ctx.task.label_names, **ctx.task.export_meta()}
    return ctx.extra_exports(model, inputs, labels, meta)


POSTPROCESS = {"conf_threshold": 0.3, "iou_threshold": 0.5, "max_det": 20}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """One real onnx-nms export (an ONNX export takes seconds), the box agreements its parity computed,
    and a copy of its folder: an earlier run's export/onnx-nms, with passing parity."""
    from edgekd.tasks.detection import metrics

    root = tmp_path_factory.mktemp("earlier")
    calls = []
    real = metrics.box_agreement

    def spy(got, want, **kw):
        calls.append(kw)
        return real(got, want, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(metrics, "box_agreement", spy)
        ctx = _context(root / "runs", nms_in_graph=True, **POSTPROCESS)
        rec = _nms_export(ctx)["onnx-nms"]
    keep = root / "onnx-nms-copy"
    shutil.copytree(ctx.run.stage_dir("export") / "onnx-nms", keep)
    return rec, keep, calls


def test_onnx_nms_records_the_recipe_postprocess_and_parity_uses_it(earlier):
    rec, folder, calls = earlier
    assert rec["status"] == "ok" and rec["parity"]["passed"], rec
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["postprocess"] == POSTPROCESS and meta["nms_in_graph"] is True
    assert calls and all(kw == POSTPROCESS for kw in calls)  # parity's box agreement, at the recipe's values


def _plant(earlier, ctx) -> Path:
    final = ctx.run.stage_dir("export") / "onnx-nms"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(earlier[1], final)
    assert json.loads((final / "artifact.json").read_text())["parity"]["passed"] is True
    return final


def test_a_failed_onnx_nms_export_removes_the_earlier_one(earlier, here, monkeypatch):
    from edgekd.export.onnx import OnnxExporter

    def fail(self, *a, **kw):
        raise UnsupportedTargetError("conversion failed here")

    monkeypatch.setattr(OnnxExporter, "export", fail)
    ctx = _context(nms_in_graph=True, **POSTPROCESS)
    # Recorded (export.strict: false): the earlier folder is not left to be served or benched as current.
    final = _plant(earlier, ctx)
    rec = _nms_export(ctx)["onnx-nms"]
    assert rec["status"] == "failed" and "conversion failed here" in rec["reason"]
    assert not final.exists()
    # Raised (export.strict: true): the same.
    strict = _context(nms_in_graph=True, export={"strict": True}, **POSTPROCESS)
    final = _plant(earlier, strict)
    with pytest.raises(UnsupportedTargetError, match="conversion failed here"):
        _nms_export(strict)
    assert not final.exists()


def test_an_onnx_nms_parity_miss_replaces_the_earlier_one_marked_failed(earlier, here):
    from edgekd.export.stage import load_artifact

    ctx = _context(nms_in_graph=True, export={"max_abs_diff": 1e-30}, **POSTPROCESS)
    final = _plant(earlier, ctx)
    with pytest.raises(ParityError, match="'onnx-nms': max abs diff .* > allowed 1e-30") as info:
        _nms_export(ctx)
    rec = info.value.records["onnx-nms"]
    assert rec["parity"]["passed"] is False and rec["folder"] == str(final)
    # This run's folder stays for inspection, marked failed, which serve, bench and edgekd.load refuse.
    assert json.loads((final / "artifact.json").read_text())["parity"]["passed"] is False
    with pytest.raises(ParityError, match="failed its parity check"):
        load_artifact(final)


def test_a_failed_export_target_still_remakes_onnx_nms_so_none_of_an_earlier_model_stays(earlier, here, monkeypatch):
    """export.targets missing a parity threshold raises after the onnx-nms export of this model was made and
    published with them: the earlier run's folder (marked here) is replaced, and the miss's records hold it.
    (A failure that stops the stage, export.strict's, publishes nothing: tests/export/test_export_publish.py.)"""
    import edgekd.export.stage as export_stage
    import edgekd.stages.export as stage
    from edgekd.tasks.detection.models import build_detector

    ctx = _context(nms_in_graph=True, **POSTPROCESS)
    final = _plant(earlier, ctx)
    (final / "earlier-run").write_text("")
    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(), len(ctx.task.label_names), 64).eval()
    with torch.no_grad():
        for branch in model.head.cls:
            branch[-1].bias.uniform_(-3, 3)
    monkeypatch.setattr(stage, "load_source", lambda c: model)
    real = export_stage.export_all

    def failing_export_all(module, io, targets, out_root, *a, **kw):  # export.targets miss; onnx-nms is real
        if io.output_names == ["detections"]:
            return real(module, io, targets, out_root, *a, **kw)
        err = ParityError("Exported artifacts fail parity: 'onnx': max abs diff 1 > allowed 1e-30.")
        err.records = {"onnx": {"target": "onnx", "parity": {"passed": False}}}
        raise err

    monkeypatch.setattr(export_stage, "export_all", failing_export_all)
    with pytest.raises(ParityError, match="'onnx': max abs diff") as info:
        stage.run_export(ctx)
    assert (final / "artifact.json").is_file() and not (final / "earlier-run").exists()  # this model's export
    assert set(info.value.records) == {"onnx", "onnx-nms"} and info.value.records["onnx-nms"]["status"] == "ok"
