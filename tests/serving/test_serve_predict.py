"""POST /predict through TestClient: results, truncation, auth and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from serve_helpers import LABELS, RUN_NAME

from edgekd.serving.codec import softmax

TEXTS = ["a good and moving film", "the plot was dull and boring", "fine"]


def test_single_text_matches_onnx_runtime(make_client, reference):
    client = make_client()
    r = client.post("/predict", json={"text": TEXTS[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RUN_NAME and body["target"] == "onnx"
    [pred] = body["predictions"]
    want = softmax(reference(TEXTS[0])[None])[0]
    got = np.array([pred["probabilities"][name] for name in LABELS])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert pred["label"] == LABELS[int(want.argmax())]
    assert pred["score"] == pytest.approx(want.max(), abs=1e-6)
    assert pred["truncated"] is False
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0)


def test_texts_keep_order_and_match_text_by_text(make_client, reference):
    client = make_client()
    r = client.post("/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(TEXTS)
    for text, pred in zip(TEXTS, preds, strict=True):
        want = softmax(reference(text)[None])[0]
        got = np.array([pred["probabilities"][name] for name in LABELS])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_long_text_is_truncated_and_flagged(make_client):
    client = make_client(max_length=8)
    long = " ".join(["good"] * 40)
    r = client.post("/predict", json={"texts": [long, "fine"]})
    assert r.status_code == 200, r.text
    assert [p["truncated"] for p in r.json()["predictions"]] == [True, False]
    assert "edgekd_texts_truncated_total 1.0" in client.get("/metrics").text


def test_long_text_is_rejected_when_asked(make_client):
    client = make_client(max_length=8, overflow="reject")
    r = client.post("/predict", json={"texts": ["fine", " ".join(["good"] * 40)]})
    assert r.status_code == 422
    assert "texts[1] is longer than 8 tokens" in r.json()["error"]


def test_max_length_above_the_artifacts_is_refused(export_dir):
    from fastapi.testclient import TestClient
    from serve_helpers import ort_loader

    from edgekd.errors import StageError
    from edgekd.serving import ServeSettings, create_app

    app = create_app(ServeSettings(export_dir=export_dir, max_length=4096), loader=ort_loader)
    with pytest.raises(StageError, match="max_length=4096 exceeds the artifact's max_length=32"):
        with TestClient(app):
            pass


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"text": ""}, 422, "text is empty"),
        ({"text": "   "}, 422, "text is empty"),
        ({"texts": []}, 422, "'texts' is empty"),
        ({"texts": ["fine", ""]}, 422, "texts[1] is empty"),
        ({"text": 123}, 422, "text: Input should be a valid string"),
        ({"texts": ["fine", 4]}, 422, "texts.1: Input should be a valid string"),
        ({"texts": "fine"}, 422, "texts: Input should be a valid list"),
        ({"texts": ["fine"] * 5}, 422, "5 texts in one request; this server takes at most 4"),
        ({"text": "x" * 201}, 422, "text has 201 characters; this server takes at most 200"),
        ({"text": "fine", "texts": ["fine"]}, 422, "give either 'text'"),
        ({}, 422, "give either 'text'"),
        ({"txt": "fine"}, 422, "txt: Extra inputs are not permitted"),
        ([1, 2], 422, "invalid request"),
    ],
)
def test_bad_bodies_get_4xx_with_a_message(make_client, body, status, fragment):
    client = make_client(max_items=4, max_text_chars=200)
    r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_malformed_json_is_400(make_client):
    client = make_client()
    r = client.post("/predict", content=b'{"text": "fine"', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]


def test_wrong_content_type_is_415(make_client):
    client = make_client()
    r = client.post("/predict", content=b"text=fine", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert "Content-Type: application/json" in r.json()["error"]
    r = client.post("/predict", content=b'{"text": "fine"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_body_over_the_limit_is_413(make_client):
    client = make_client(max_body_bytes=100)
    r = client.post("/predict", json={"text": "good " * 50})
    assert r.status_code == 413
    assert "100-byte limit" in r.json()["error"]
    assert 'edgekd_errors_total{kind="too_large"} 1.0' in client.get("/metrics").text


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def test_compressed_bodies_answer_as_the_plain_body(make_client):
    """gzip and deflate bodies (Content-Encoding), read as the v2 infer route reads them."""
    client = make_client()
    body = json.dumps({"texts": TEXTS}).encode()
    json_type = {"content-type": "application/json"}
    want = client.post("/predict", content=body, headers=json_type)
    assert want.status_code == 200, want.text
    for encoding, packed in (("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)),
                             ("deflate", zlib.compress(body)), ("deflate", _raw_deflate(body)),
                             ("gzip", gzip.compress(body[:10]) + gzip.compress(body[10:])),  # two members
                             ("gzip, deflate", zlib.compress(gzip.compress(body))), ("identity", body)):
        r = client.post("/predict", content=packed, headers={**json_type, "content-encoding": encoding})
        assert r.status_code == 200, (encoding, r.text)
        assert r.json() == want.json(), encoding


def test_compressed_bodies_are_bounded_and_checked(make_client):
    client = make_client(max_body_bytes=20_000)
    json_type = {"content-type": "application/json"}
    # A body that inflates past the body limit: 413, though its compressed size is far under it.
    big = json.dumps({"text": "a" * 5_000_000}).encode()
    for encoding, bomb in (("gzip", gzip.compress(big)), ("deflate", zlib.compress(big))):
        assert len(bomb) < 20_000
        r = client.post("/predict", content=bomb, headers={**json_type, "content-encoding": encoding})
        assert r.status_code == 413, (encoding, r.text)
        assert f"inflates ({encoding}) to over the 20000-byte limit" in r.json()["error"]
    r = client.post("/predict", content=b"not gzip at all", headers={**json_type, "content-encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip data" in r.json()["error"], r.text
    body = json.dumps({"text": "fine"}).encode()
    r = client.post("/predict", content=gzip.compress(body)[:-12], headers={**json_type, "content-encoding": "gzip"})
    assert r.status_code == 400 and "ends early" in r.json()["error"], r.text
    r = client.post("/predict", content=body, headers={**json_type, "content-encoding": "br"})
    assert r.status_code == 415 and "Content-Encoding br is not one this server reads" in r.json()["error"], r.text
    assert client.app.state.metrics.texts._value.get() == 0  # every one refused before the model ran


def test_unknown_route_and_method_are_json_4xx(make_client):
    client = make_client()
    r = client.get("/nope")
    assert r.status_code == 404 and "no route GET /nope" in r.json()["error"]
    r = client.get("/predict")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]


def test_api_key(make_client):
    client = make_client(api_key="s3cret")
    assert client.post("/predict", json={"text": "fine"}).status_code == 401
    r = client.post("/predict", json={"text": "fine"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "the API key is not valid."
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/predict", json={"text": "fine"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/predict", json={"text": "fine"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/metadata").status_code == 401
    assert client.get("/metadata", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.post(f"/v2/models/{RUN_NAME}/infer", json={}).status_code == 401
    # Probes and scrapes stay open.
    assert client.get("/health").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_empty_api_key_is_a_settings_error():
    from pydantic import ValidationError

    from edgekd.serving import ServeSettings

    with pytest.raises(ValidationError, match="api_key is empty"):
        ServeSettings(api_key="")


def test_openapi_has_examples(make_client):
    spec = make_client().get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["PredictRequest"]["examples"][0] == {"text": "a warm, funny and moving film"}
    assert "examples" in schemas["PredictResponse"]
    assert "examples" in schemas["InferenceRequest"]
    assert "/v2/models/{name}/infer" in spec["paths"]
