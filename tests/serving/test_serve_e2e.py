"""End to end: the export stage writes runs/<name>/export/onnx/, `serve` loads it with load_artifact."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from serve_helpers import LABELS, LiveServer, _run_slim

from edgekd.runfolder import RunFolder


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, tiny_classifier_dir):
    """A run folder whose export/onnx/ was written by ``export_all`` (parity included)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.export.stage import export_all
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport

    root = tmp_path_factory.mktemp("staged") / "sentiment"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    enc = tok(["a good film", "the plot was dull", "fine", "boring and bland"], padding="max_length",
              max_length=16, truncation=True, return_tensors="np")
    inputs = {n: enc[n].astype(np.int64) for n in TEXT_IO.input_names}
    with torch.no_grad():
        records = export_all(
            SequenceClassifierExport(model), TEXT_IO, ["onnx"], root / "export", ExportConfig(targets=["onnx"]),
            inputs, np.array([1, 0, 1, 0]), None,
            {"labels": LABELS, "max_length": 16, "task": "text-classification", "source_model": "tiny"},
            [tiny_classifier_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")],
        )
    assert records["onnx"]["status"] == "ok", records
    folder = root / "export" / "onnx"
    RunFolder(root).record("export", "fp", {"onnx": records["onnx"]["parity"]}, artifacts=[folder])
    return root


def test_serve_runs_the_exported_artifact_over_http(staged_run):
    """`edgekd serve RUN_DIR --target onnx` in a thread: the default loader, real uvicorn, real HTTP."""
    from edgekd.serving import ServeSettings, create_app
    from edgekd.serving.model import resolve_export_dir

    folder = resolve_export_dir(staged_run, "onnx")
    srv = LiveServer(create_app(ServeSettings(export_dir=folder))).start()  # default loader: load_artifact
    try:
        r = httpx.post(f"{srv.url}/predict", json={"texts": ["a good film", "dull"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "sentiment" and body["target"] == "onnx"
        assert [set(p["probabilities"]) for p in body["predictions"]] == [set(LABELS)] * 2
        meta = httpx.get(f"{srv.url}/metadata").json()
        assert meta["runtime"]["runner"] == "OnnxRunner"
        assert meta["artifact"]["parity"]["ran"] is True
        assert meta["run"]["export"]["ran"] is True
        artifact = json.loads((folder / "artifact.json").read_text())
        assert meta["artifact"]["sha256"] == artifact["sha256"]
    finally:
        srv.stop()


def test_runtime_threads_reach_the_runner(staged_run, make_client):
    client = make_client(loader=None, export_dir=staged_run / "export" / "onnx", threads=1)
    assert client.get("/metadata").json()["runtime"]["threads"] == 1


def test_unknown_runtime_option_is_refused(staged_run):
    from fastapi.testclient import TestClient

    from edgekd.errors import UnsupportedTargetError
    from edgekd.serving import ServeSettings, create_app

    app = create_app(ServeSettings(export_dir=staged_run / "export" / "onnx", runtime_options={"gpu": True}))
    with pytest.raises(UnsupportedTargetError, match="does not accept option"):
        with TestClient(app):
            pass


def test_exported_artifact_serves_without_torch(staged_run):
    out = _run_slim(staged_run / "export" / "onnx", "stage")
    assert out == {"status": 200, "v2": 404, "heavy": []}
