"""Artifacts other than the plain dynamic ONNX file, and the torch-free deployment path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_helpers import LABELS, _run_slim, ort_loader, slow_loader

from edgekd.errors import StageError
from edgekd.serving.codec import softmax


class PlannedRunner:
    """A runner whose runtime planned memory for at most ``max_batch`` rows (as ExecuTorch and
    Core ML runners report), refusing more as such runtimes do."""

    def __init__(self, inner, max_batch: int):
        self.inner, self.max_batch = inner, max_batch
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.calls: list[int] = []

    def run(self, inputs):
        rows = len(inputs["input_ids"])
        if rows > self.max_batch:
            raise RuntimeError(f"{rows} rows exceed the planned {self.max_batch}")
        self.calls.append(rows)
        return self.inner.run(inputs)


def test_runner_max_batch_is_respected(make_client, reference):
    box = []

    def loader(folder, **opts):
        runner, meta = ort_loader(folder, **opts)
        box.append(PlannedRunner(runner, max_batch=2))
        return box[-1], meta

    client = make_client(loader=loader, batching=True, max_batch_size=32)
    assert client.get("/metadata").json()["batching"]["max_batch_size"] == 2
    texts = ["good", "the plot was dull and boring", "fine", "a warm story", "bland"]
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    assert box[0].calls[1:] == [2, 2, 1]  # after the warm-up call
    got = np.array([[p["probabilities"][k] for k in LABELS] for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, softmax(np.stack([reference(t) for t in texts])), atol=1e-5)


def test_batching_splits_one_request_larger_than_max_batch_size(make_client):
    """max_batch_size bounds every runner call when batching, a single request with more texts included."""
    box: list = []
    client = make_client(loader=slow_loader(0.0, box), batching=True, max_batch_size=2)
    r = client.post("/predict", json={"texts": ["good", "the plot was dull and boring", "fine", "a warm story", "bland"]})
    assert r.status_code == 200, r.text
    assert box[0].calls[1:] == [2, 2, 1]  # after the warm-up call


def test_runner_that_drops_rows_is_a_clear_error(make_client, caplog):
    class DropsRows:
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

        def run(self, inputs):
            return {"logits": np.zeros((1, 2), dtype=np.float32)}

    from fastapi.testclient import TestClient

    client = make_client(loader=lambda folder, **o: (DropsRows(), ort_loader(folder)[1]))
    with caplog.at_level("ERROR", logger="edgekd.serving"):
        r = TestClient(client.app, raise_server_exceptions=False).post("/predict", json={"texts": ["a", "b"]})
    assert r.status_code == 500
    assert "returned 1 rows of 'logits' for 2 inputs" in caplog.text


def test_labels_default_when_artifact_has_none(run_copy, make_client):
    from edgekd.export.base import write_artifact_meta

    folder = run_copy / "export" / "onnx"
    meta = json.loads((folder / "artifact.json").read_text())
    del meta["labels"]
    write_artifact_meta(folder, meta)
    r = make_client(export_dir=folder).post("/predict", json={"text": "fine"})
    assert set(r.json()["predictions"][0]["probabilities"]) == {"LABEL_0", "LABEL_1"}


def test_labels_that_do_not_fit_the_model_are_refused(run_copy):
    from fastapi.testclient import TestClient

    from edgekd.export.base import write_artifact_meta
    from edgekd.serving import ServeSettings, create_app

    folder = run_copy / "export" / "onnx"
    meta = json.loads((folder / "artifact.json").read_text())
    meta["labels"] = ["a", "b", "c"]
    write_artifact_meta(folder, meta)
    with pytest.raises(StageError, match=r"expected \[batch, 3\]"):
        with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)):
            pass


def test_serving_onnx_imports_no_torch(export_dir):
    out = _run_slim(export_dir, "plain")
    assert out == {"status": 200, "v2": 404, "heavy": []}


def test_folder_without_tokenizer_json_falls_back_to_autotokenizer(run_copy, make_client, reference):
    from edgekd.export.base import read_artifact_meta, write_artifact_meta

    folder = run_copy / "export" / "onnx"
    (folder / "tokenizer.json").unlink()
    meta = read_artifact_meta(folder)  # exported so: no tokenizer.json recorded (removing a recorded one is refused)
    del meta["extra_sha256"]["tokenizer.json"]
    write_artifact_meta(folder, meta)
    client = make_client(export_dir=folder)
    assert type(client.app.state.serving.model.codec.tokenizer).__name__ == "_AutoTokenizer"
    texts = ["a good film", " ".join(["dull"] * 60)]
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    got = np.array([[p["probabilities"][k] for k in LABELS] for p in preds])
    np.testing.assert_allclose(got, softmax(np.stack([reference(t) for t in texts])), atol=1e-5)
    assert [p["truncated"] for p in preds] == [False, True]


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([[1000.0, -1000.0, 999.0], [-1e30, 0.0, 1e30]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [1 / (1 + np.exp(-1)), 0.0, np.exp(-1) / (1 + np.exp(-1))], rtol=1e-12)
