"""The detection recipe end to end through the CLI, on a tiny synthetic set: the same stages, run
folder, manifest, exporters and benchmark as text, with mAP where text has accuracy."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.recipe import load_recipe


def tiny_detection_recipe(tmp_path, **changes) -> dict:
    recipe = load_recipe("detect-default").model_dump(mode="json")
    recipe.update(name="tiny-det", output_dir=str(tmp_path / "runs"))
    recipe["detection"].update(image_size=64, nms_in_graph=True, synthetic={"train": 48, "validation": 12, "test": 12, "max_objects": 3,
                                                         "seed": 1})
    recipe["teacher"]["finetune"].update(epochs=1, batch_size=16)
    recipe["distill"]["train"].update(epochs=1, batch_size=16)
    recipe["runtime"]["precision"] = "fp32"
    recipe["prune"].update(enabled=True, keep_params=0.7, recover_epochs=1)
    # No export.max_abs_diff: each target is held to its precision's default gate (one absolute bound for the
    # fp32 ONNX file and TensorRT's fp16 graph alike would fail fp16's rounding of boxes in pixels).
    recipe["export"].update(targets=["onnx", "tensorrt"], parity_examples=12, min_top1_agreement=None)
    recipe["quantize"].update(calibration_samples=8, sensitivity_examples=12, speed_runs=5)
    # Each model still in its own process (threads pinned to one: the models are tiny), in one round
    # (bench.rounds is tested in tests/devices; three rounds here start three times the processes).
    recipe["bench"].update(batch_sizes=[1], runs=3, warmup=1, torch_models=True, threads=1, rounds=1)
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value}
    return recipe


@pytest.mark.slow
def test_detection_run_writes_every_stage_with_map_and_its_exports_serve_boxes(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_detection_recipe(tmp_path)))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny-det"
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["teacher", "distill", "baseline", "eval", "prune", "export", "quantize",
                                        "bench"]
    assert manifest["task"] == "detection" and manifest["labels"] == ["circle", "square", "triangle", "cross"]
    # The summary at the end names every stage that ran, judged by mAP, and says how to serve the result.
    summary = res.output[res.output.index("edgekd run 'tiny-det': stages"):]
    for stage in manifest["stages"]:
        assert f"│ {stage} " in summary and f"│ {stage} " in summary.split("test split")[0], stage
    assert "validation mAP@0.5:0.95" in summary and "test mAP@0.5:0.95: teacher" in summary
    assert "onnx-nms:" in summary and "accuracy guard" in summary and "fastest:" in summary
    assert f"serve it: edgekd serve {run} --target" in " ".join(summary.split())
    assert manifest["data"]["train"]["images"] == 48 and manifest["data"]["image_size"] == 64

    ev = manifest["stages"]["eval"]["metrics"]
    for who in ("teacher", "student", "baseline"):
        assert 0.0 <= ev[who]["map50_95"] <= ev[who]["map50"] <= 1.0
    assert ev["student"]["params"] < ev["teacher"]["params"] / 3
    assert "distill_gain_over_baseline_map50_95" in ev["summary"]
    distill_logs = manifest["stages"]["distill"]["metrics"]["train_history"][0]
    assert {"kd_cls", "kd_box", "kd_feat"} <= set(distill_logs)  # every KD term trained
    assert "kd_cls" not in manifest["stages"]["baseline"]["metrics"]["train_history"][0]

    pruned = manifest["stages"]["prune"]["metrics"]
    assert pruned["params_after"] < pruned["params_before"]

    onnx = manifest["stages"]["export"]["metrics"]["targets"]["onnx"]
    assert onnx["status"] == "ok" and onnx["parity"]["passed"]
    assert onnx["parity"]["box_agreement"] is not None and onnx["parity"]["max_abs_diff"] < 1e-3
    meta = json.loads((run / "export" / "onnx" / "artifact.json").read_text())
    assert meta["task"] == "detection" and meta["image_size"] == 64
    assert meta["io"]["input_names"] == ["images"] and meta["io"]["output_names"] == ["boxes", "scores"]
    nms = manifest["stages"]["export"]["metrics"]["targets"]["onnx-nms"]
    assert nms["status"] == "ok" and nms["parity"]["passed"] and nms["parity"]["box_agreement"] is not None
    nms_meta = json.loads((run / "export" / "onnx-nms" / "artifact.json").read_text())
    assert nms_meta["io"]["output_names"] == ["detections"] and nms_meta["nms_in_graph"] is True
    trt = manifest["stages"]["export"]["metrics"]["targets"]["tensorrt"]
    assert trt["status"] in ("not_built", "ok")  # the TensorRT-ready ONNX and trtexec command, or an engine
    if trt["status"] == "not_built":  # the fp16 graph its engine is built from, checked under ONNX Runtime
        graph = trt["parity"]["graph"]
        assert graph["ran"] and graph["passed"] and graph["tolerance"]["from"] == "default", graph

    assert "map50_95" in manifest["stages"]["quantize"]["metrics"]["test"]["quantized"]
    table = (run / "bench" / "local" / "table.md").read_text()
    assert "mAP@0.5:0.95" in table and "image 64x64" in table
    models = manifest["stages"]["bench"]["metrics"]["models"]
    assert {"pytorch-teacher", "pytorch-student", "pytorch-student-pruned", "onnx"} <= set(models)
    served_export_answers_with_boxes(run)  # (in this test: a second tiny run would cost about 45 s)

    # Nothing changed: every stage is skipped; a KD weight changed: distill and what follows rerun.
    before = {s: r["finished"] for s, r in manifest["stages"].items()}
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {s: r["finished"] for s, r in after.items()} == before
    res = runner.invoke(app, ["distill", str(path), "--set", "detection.cls_weight=0.5"])
    assert res.exit_code == 0, res.output
    again = json.loads((run / "manifest.json").read_text())["stages"]
    assert again["teacher"]["finished"] == before["teacher"]
    assert again["distill"]["finished"] != before["distill"]


def served_export_answers_with_boxes(run):
    """The run's exported detector behind POST /predict: an image in, boxes in its own pixels out (host NMS
    and NMS in the graph)."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from edgekd.serving import ServeSettings, create_app

    buf = io.BytesIO()
    Image.new("RGB", (160, 90), (200, 30, 30)).save(buf, format="PNG")
    for target in ("onnx", "onnx-nms"):
        with TestClient(create_app(ServeSettings(export_dir=run / "export" / target))) as client:
            r = client.post("/predict?conf_threshold=0.001", files={"file": ("x.png", buf.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            pred = r.json()["predictions"][0]
            assert (pred["width"], pred["height"]) == (160, 90)
            for d in pred["detections"]:
                x1, y1, x2, y2 = d["box"]
                assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 90 and d["label"] in recipe_labels()
            meta = client.get("/metadata").json()
            assert meta["task"] == "detection" and meta["image_size"] == 64


def recipe_labels() -> list[str]:
    from edgekd.tasks.detection.synthetic import CLASS_NAMES

    return list(CLASS_NAMES)
