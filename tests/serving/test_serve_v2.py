"""The Open Inference Protocol v2 routes, in the protocol's own JSON shapes."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import LABELS, MAX_LENGTH, RUN_NAME

from edgekd.serving.codec import softmax

INFER = f"/v2/models/{RUN_NAME}/infer"


def test_health_routes_answer_json(make_client):
    client = make_client()
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                       (f"/v2/models/{RUN_NAME}/ready", {"ready": True}),
                       (f"/v2/models/{RUN_NAME}/versions/1/ready", {"ready": True})):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", path
        assert r.json() == body, path


def test_server_and_model_metadata(make_client):
    client = make_client()
    assert client.get("/v2").json() == {"name": "edgekd", "version": "0.1.0", "extensions": [
        "classification", "binary_tensor_data", "model_configuration"]}
    meta = client.get(f"/v2/models/{RUN_NAME}").json()
    assert meta["name"] == RUN_NAME and meta["platform"] == "onnxruntime_onnx"
    assert {"name": "text", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]} in meta["inputs"]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]} in meta["outputs"]
    assert meta["versions"] == ["1"]
    assert client.get(f"/v2/models/{RUN_NAME}/versions/1").json() == meta
    assert meta["parameters"]["labels"] == "negative,positive"


def test_infer_bytes_returns_probabilities(make_client, reference):
    client = make_client()
    texts = ["a good film", "dull and boring"]
    r = client.post(INFER, json={"id": "42", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                                          "data": texts}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == RUN_NAME and body["id"] == "42"
    assert body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert set(out) == {"probabilities", "logits", "label", "truncated"}
    probs = out["probabilities"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [2, 2]
    want = softmax(np.stack([reference(t) for t in texts]))
    np.testing.assert_allclose(np.reshape(probs["data"], (2, 2)), want, atol=1e-5)
    assert out["label"] == {"name": "label", "shape": [2], "datatype": "BYTES",
                            "data": [LABELS[k] for k in want.argmax(1)]}
    assert out["truncated"]["data"] == [False, False]


def test_infer_requested_outputs_and_nested_data(make_client):
    client = make_client()
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES",
                                             "data": [["fine"]]}],
                                 "outputs": [{"name": "label"}, {"name": "probabilities"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
    assert "id" not in body


def test_infer_int64_tokens_equals_bytes(make_client):
    from tokenizers import Tokenizer

    client = make_client()
    tok = Tokenizer.from_file(str(client.app.state.serving.model.folder / "tokenizer.json"))
    texts = ["a good film", "the plot was dull and very boring"]
    encs = [tok.encode(t).ids for t in texts]
    width = max(map(len, encs))
    ids = [e + [0] * (width - len(e)) for e in encs]
    mask = [[1] * len(e) + [0] * (width - len(e)) for e in encs]
    r = client.post(INFER, json={"inputs": [
        {"name": "input_ids", "shape": [2, width], "datatype": "INT64", "data": sum(ids, [])},
        {"name": "attention_mask", "shape": [2, width], "datatype": "INT64", "data": mask},
    ], "outputs": [{"name": "probabilities"}]})
    assert r.status_code == 200, r.text
    from_ids = r.json()["outputs"][0]["data"]
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}],
                                 "outputs": [{"name": "probabilities"}]})
    np.testing.assert_allclose(from_ids, r.json()["outputs"][0]["data"], atol=1e-5)


def _tokens(ids, mask=None, shape=None, dtype="INT64"):
    shape = shape or [1, len(ids)]
    inputs = [{"name": "input_ids", "shape": shape, "datatype": dtype, "data": ids}]
    if mask is not None:
        inputs.append({"name": "attention_mask", "shape": shape, "datatype": dtype, "data": mask})
    return {"inputs": inputs}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, "input 'text' has no data"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "must have datatype BYTES"),
        ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["fine"]}]},
         "has shape [2] (2 elements) but its data holds 1"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [""]}]}, "texts[0] is empty"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}, "texts[0] is not a string (got int)"),
        ({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
         "shape [batch] or [batch, 1]"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                     {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [2]}]},
         "'text' alone or the token tensors"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
          "outputs": [{"name": "scores"}]}, "unknown output(s) ['scores']"),
        ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "unknown: ['pixels']"),
        (_tokens([2, 5, 3]), "missing: ['attention_mask']"),
        (_tokens([2, 5, 3], [1, 1, 1], dtype="FP32"), "must be an integer tensor"),
        (_tokens([2, 5.5, 3], [1, 1, 1]), "non-integer values"),
        (_tokens([2, 5, 3], [1, 1, 1], shape=[3]), "shape [batch, sequence]"),
        (_tokens([2, 9999, 3], [1, 1, 1]), "input_ids must lie in [0, 43)"),
        (_tokens([2, -1, 3], [1, 1, 1]), "input_ids must lie in"),
        (_tokens([2, 5, 3], [1, 2, 1]), "attention_mask must hold only 0 and 1"),
        (_tokens([2, 5, 3], [0, 0, 0]), "at least one 1"),
        (_tokens([2] * (MAX_LENGTH + 1), [1] * (MAX_LENGTH + 1)), f"over this model's max_length {MAX_LENGTH}"),
        ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [2, 3]},
                     {"name": "attention_mask", "shape": [2, 1], "datatype": "INT64", "data": [1, 1]}]},
         "they must match"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                     {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["b"]}]}, "more than once"),
        ({"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]},
         "greater than or equal to 0"),
    ],
)
def test_bad_infer_requests_are_4xx(make_client, body, fragment):
    client = make_client()
    r = client.post(INFER, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert fragment in r.json()["error"], r.json()["error"]


def test_unknown_model_is_404(make_client):
    client = make_client()
    for r in (client.get("/v2/models/bert"), client.get("/v2/models/bert/ready"),
              client.post("/v2/models/bert/infer", json={"inputs": [
                  {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})):
        assert r.status_code == 404
        assert r.json() == {"error": f"unknown model 'bert': this server serves '{RUN_NAME}'."}


def test_model_name_setting(make_client):
    client = make_client(model_name="sentiment")
    assert client.get("/v2/models/sentiment").status_code == 200
    assert client.post("/predict", json={"text": "fine"}).json()["model"] == "sentiment"


def test_refused_outputs_are_refused_before_the_model_runs(make_client):
    """An output the model does not give for the inputs sent is a 400 with no inference run: the
    batch-size histogram and the texts counter do not move."""
    client = make_client()
    text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}

    def ran() -> bool:
        metrics = client.get("/metrics").text
        return not ("edgekd_inference_batch_size_count 0.0" in metrics and "edgekd_texts_total 0.0" in metrics)

    r = client.post(INFER, json={**text, "outputs": [{"name": "label"}, {"name": "scores"}]})
    assert r.status_code == 400 and "unknown output(s) ['scores']" in r.json()["error"], r.text
    assert not ran()
    r = client.post(INFER, json={**_tokens([2, 5, 3], [1, 1, 1]), "outputs": [{"name": "truncated"}]})
    assert r.status_code == 400, r.text
    assert not ran()
    assert "['truncated'] are not given for these inputs ('truncated' only with input 'text')" in r.json()["error"]
    # With the input it comes with, 'truncated' is given.
    r = client.post(INFER, json={**text, "outputs": [{"name": "truncated"}]})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [False], r.text


def test_token_tensor_rows_are_counted_as_texts(make_client):
    client = make_client()
    r = client.post(INFER, json=_tokens([2, 5, 3, 2, 7, 3], [1, 1, 1, 1, 1, 1], shape=[2, 3]))
    assert r.status_code == 200, r.text
    assert "edgekd_texts_total 2.0" in client.get("/metrics").text
