"""No input makes a 500: the hand-found ones each have a regression test, and a property-based fuzz
of the server's own OpenAPI document (schemathesis) finds no 5xx and no answer the document does not
describe. Also: bodies written for other serving APIs get a helpful 422; slow and idle connections
are closed."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
from serve_helpers import RUN_NAME

INFER = f"/v2/models/{RUN_NAME}/infer"
DEEP = 5_000


def _nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


@pytest.mark.parametrize("path", ["/predict", INFER])
def test_deeply_nested_json_is_400(make_client, path):
    client = make_client()
    bodies = [f'{{"text": {_nested(DEEP)}}}', f'{{"texts": {_nested(DEEP)}}}',
              f'{{"inputs": [{{"name": "text", "shape": [1], "datatype": "BYTES", "data": {_nested(DEEP)}}}]}}']
    for body in bodies:
        r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "nests arrays or objects too deeply" in r.json()["error"]


def test_nesting_under_the_limit_is_still_answered(make_client):
    client = make_client()  # 500 levels parse, and nested data is flattened row-major: one text
    r = client.post(INFER, content=json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                           "data": json.loads(_nested(500))}]}).encode())
    assert r.status_code == 200, r.text


def test_lone_surrogate_is_422(make_client):
    client = make_client()
    raw = b'{"text": "bad \\ud800 text"}'  # valid JSON, but not a valid Unicode string
    for content_type in ("application/json",):
        r = client.post("/predict", content=raw, headers={"content-type": content_type})
        assert r.status_code == 422, r.text
        assert "lone surrogate (U+D800) at character 4" in r.json()["error"]
    r = client.post("/predict", content=b'{"texts": ["fine", "x \\udfff"]}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "texts[1] holds a lone surrogate" in r.json()["error"]
    v2 = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["bad \\ud800 text"]}]}'
    r = client.post(INFER, content=v2)
    assert r.status_code == 422 and "lone surrogate" in r.json()["error"]
    # A pair is fine.
    assert client.post("/predict", content=b'{"text": "ok \\ud83d\\ude00"}',
                       headers={"content-type": "application/json"}).status_code == 200


def test_binary_bytes_that_are_not_utf8_are_400(make_client):
    client = make_client()
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    r = client.post(INFER, content=header + struct.pack("<I", 2) + b"\xff\xfe",
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
@pytest.mark.parametrize("name", ["input_ids", "attention_mask"])
def test_int64_out_of_range_is_400(make_client, name, value):
    client = make_client()
    tensors = {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}
    tensors[name] = [2, value, 3]
    body = {"inputs": [{"name": n, "shape": [1, 3], "datatype": "INT64", "data": d} for n, d in tensors.items()]}
    r = client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    assert f"input '{name}' holds values outside int64's range" in r.json()["error"]


@pytest.mark.parametrize(
    ("headers", "tail", "fragment"),
    [
        ({"Inference-Header-Content-Length": "99999"}, b"", "must be the length of the JSON part"),
        ({"Inference-Header-Content-Length": "x"}, b"", "must be the length of the JSON part"),
        ({}, b"\x00\x01", "not valid JSON"),
        (None, b"\x00" * 3, "says 8 bytes of binary data but the body has only 3 left"),
        (None, b"\x00" * 20, "12 bytes of binary data that no input's binary_data_size accounts for"),
    ],
)
def test_bad_binary_requests_are_400(make_client, headers, tail, fragment):
    client = make_client()
    header = json.dumps({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64",
                                     "parameters": {"binary_data_size": 8}},
                                    {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64",
                                     "data": [1]}]}).encode()
    if headers is None:
        headers = {"Inference-Header-Content-Length": str(len(header))}
    r = client.post(INFER, content=header + tail, headers=headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"], r.json()["error"]


def test_v2_json_without_content_type_and_wrong_type(make_client):
    client = make_client()
    body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}).encode()
    assert client.post(INFER, content=body).status_code == 200  # no Content-Type, as tritonclient sends
    r = client.post(INFER, content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Inference-Header-Content-Length" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"inputs": "a good film"}, "inputs"), ({"inputs": ["a", "b"], "parameters": {}}, "inputs"),
     ({"instances": ["a good film"]}, "instances")],
)
def test_other_apis_bodies_get_a_helpful_422(make_client, body, field):
    client = make_client()
    r = client.post("/predict", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert f"'{field}' is the request field of" in error and '{"texts": [...]}' in error and "/v2/models" in error


# --- the OpenAPI document --------------------------------------------------------------------------------
def test_openapi_is_true(make_client):
    client = make_client()
    doc = client.get("/openapi.json").json()
    predict = doc["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json"}  # a text model takes no images
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert predict["parameters"] == []
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert {} in predict["security"]  # no key set: the key is optional
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "security" in op:
                assert "401" in op["responses"], (method, path)
            if "{name}" in path:
                assert "404" in op["responses"], (method, path)
    keyed = make_client(api_key="k").get("/openapi.json").json()
    assert {} not in keyed["paths"]["/predict"]["post"]["security"]


def test_fuzz_openapi_finds_no_5xx(make_client):
    """schemathesis draws requests from the server's own OpenAPI document (valid and invalid bodies,
    headers, query and path values) and checks each answer: no 5xx, and status code, content type
    and body as the document describes them."""
    schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (the dev extra)")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks as st_checks
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi import checks as oa

    client = make_client(api_key="k")
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    found: list[str] = []
    answered: set[tuple[str, int]] = set()
    checks = [st_checks.not_a_server_error, oa.status_code_conformance, oa.content_type_conformance,
              oa.response_schema_conformance]

    def fuzz(operation) -> None:
        @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            for headers in ({"X-API-Key": "k"}, {}):  # with the key and without (401 is documented)
                response = case.call(headers=headers)
                answered.add((operation.label, response.status_code))
                try:
                    case.validate_response(response, checks=checks)
                except FailureGroup as e:  # collected, so that one run reports every operation's failures
                    found.append(f"{operation.label} {response.status_code}: {str(e)[:300]}")

        run()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    assert not found, "\n".join(found[:10])
    # The fuzz reached the model (not only refusals), and refusals too.
    assert ("POST /predict", 200) in answered and ("POST /predict", 401) in answered
    assert any(label.endswith("/infer") and 400 <= status < 500 for label, status in answered)


# --- connection timeouts ----------------------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (read returns b''), or None if it stayed open."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_silent_and_slow_connections_are_closed(live_server):
    srv = live_server(header_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", srv.port)) as silent:
        assert _closed_within(silent, 5) is not None
    with socket.create_connection(("127.0.0.1", srv.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert _closed_within(slow, 5) is not None
    with socket.create_connection(("127.0.0.1", srv.port)) as ok:  # a complete request is answered
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ok.settimeout(5)
        assert ok.recv(4096).startswith(b"HTTP/1.1 200")


def test_idle_keep_alive_connection_is_closed(live_server):
    srv = live_server(keep_alive_timeout_s=0.5, header_timeout_s=30)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        waited = _closed_within(sock, 5)
        assert waited is not None and waited < 4


def test_slow_body_gets_408(live_server):
    srv = live_server(body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer


def test_slow_body_is_counted_under_the_route_requested(live_server):
    import httpx

    srv = live_server(body_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    text = httpx.get(f"{srv.url}/metrics").text
    assert 'edgekd_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="408"} 1.0' in text
    assert 'edgekd_errors_total{kind="timeout"} 1.0' in text
