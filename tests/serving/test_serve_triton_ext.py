"""Triton's extensions of the Open Inference Protocol as tritonclient uses them, over HTTP and gRPC:
classification (an output's top K classes as "<score>:<index>:<label>"), the binary tensor data
extension's per-output override, compressed bodies both ways, the model configuration (optional inputs,
rank-1 outputs, over gRPC too), server metadata, readiness while not ready, and the refusals that make
a request's mistakes 400s rather than silent surprises (shared-memory parameters among them)."""

from __future__ import annotations

import gzip
import json
import re
import zlib

import numpy as np
import pytest
from serve_helpers import LABELS, RUN_NAME, free_port, ort_loader

from edgekd.serving.codec import softmax

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the dev extra)")

INFER = f"/v2/models/{RUN_NAME}/infer"
TEXTS = ["a good film", "dull and boring", "fine"]
CLASS_STRING = re.compile(r"^-?\d+\.\d{6}:\d+:.+$")  # C's %f, as Triton prints a score


def _text_input(module, texts):
    inp = module.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.asarray([t.encode() for t in texts], dtype=object))
    return inp


def _check_classes(got: np.ndarray, scores: np.ndarray, k: int) -> None:
    """``got`` is Triton's classification of ``scores`` ([batch, classes]) for K = ``k``."""
    n = min(k, scores.shape[1])
    assert got.shape == (len(scores), n) and got.dtype == object
    for row, want in zip(got, scores, strict=True):
        parts = [(x.decode() if isinstance(x, bytes) else x) for x in row]
        assert all(CLASS_STRING.match(p) for p in parts), parts
        split = [p.split(":") for p in parts]
        order = np.argsort(-want, kind="stable")[:n]
        assert [int(i) for _, i, _ in split] == order.tolist()
        assert [label for _, _, label in split] == [LABELS[i] for i in order]
        np.testing.assert_allclose([float(v) for v, _, _ in split], want[order], atol=1e-6)


# --- 1. classification --------------------------------------------------------------------------------------
def test_classification_over_http_with_tritonclient(live_server):
    srv = live_server()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    try:
        outs = [httpclient.InferRequestedOutput("probabilities", class_count=1),  # binary (the default)
                httpclient.InferRequestedOutput("logits"),
                httpclient.InferRequestedOutput("label", binary_data=False)]
        result = client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)], outputs=outs)
        by_name = {o["name"]: o for o in result.get_response()["outputs"]}
        assert by_name["probabilities"]["datatype"] == "BYTES" and by_name["probabilities"]["shape"] == [3, 1]
        logits = result.as_numpy("logits")
        probs = softmax(logits).astype(np.float32)
        _check_classes(result.as_numpy("probabilities"), probs, 1)
        assert by_name["label"]["data"] == [LABELS[k] for k in probs.argmax(1)]
        # K over the class count: every class, best first; as JSON this time, on the logits.
        outs = [httpclient.InferRequestedOutput("logits", binary_data=False, class_count=5)]
        result = client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)], outputs=outs)
        entry = result.get_response()["outputs"][0]
        assert entry["datatype"] == "BYTES" and entry["shape"] == [3, 2] and "data" in entry
        _check_classes(np.asarray(entry["data"], dtype=object).reshape(3, 2), logits, 5)
        with pytest.raises(Exception, match=r"cannot be returned as classification"):
            client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)],
                         outputs=[httpclient.InferRequestedOutput("label", class_count=1)])
    finally:
        client.close()


def test_classification_over_grpc_with_tritonclient(live_server):
    port = free_port()
    live_server(grpc_port=port)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        outs = [grpcclient.InferRequestedOutput("probabilities", class_count=2), grpcclient.InferRequestedOutput("logits")]
        result = client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)], outputs=outs)
        assert [(o.name, o.datatype, list(o.shape)) for o in result.get_response().outputs] == [
            ("probabilities", "BYTES", [3, 2]), ("logits", "FP32", [3, 2])]
        _check_classes(result.as_numpy("probabilities"), softmax(result.as_numpy("logits")).astype(np.float32), 2)
        with pytest.raises(grpcclient.InferenceServerException, match="cannot be returned as classification") as err:
            client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)],
                         outputs=[grpcclient.InferRequestedOutput("truncated", class_count=1)])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


@pytest.mark.parametrize(
    ("output", "params", "fragment"),
    [
        ("label", {"classification": 1}, "output(s) ['label'] cannot be returned as classification"),
        ("truncated", {"classification": 2}, "only probabilities, logits"),
        ("probabilities", {"classification": 0}, "classification must be a whole number >= 1"),
        ("probabilities", {"classification": -3}, "(got -3)"),
        ("probabilities", {"classification": "2"}, "(got '2')"),
        ("probabilities", {"classification": True}, "(got True)"),
        ("probabilities", {"classification": 1.5}, "(got 1.5)"),
        ("probabilities", {"class_count": 2}, "the classification extension's parameter is 'classification'"),
    ],
)
def test_classification_refused_where_it_makes_no_sense(make_client, output, params, fragment):
    client = make_client()
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}],
                                 "outputs": [{"name": output, "parameters": params}]})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"], r.json()["error"]


def test_classification_refused_by_a_detector(tmp_path):
    from fastapi.testclient import TestClient
    from test_serve_detection import SIZE, export_tiny_detector

    from edgekd.serving import ServeSettings, create_app

    folder = export_tiny_detector(tmp_path / "shapes" / "export" / "onnx")
    with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)) as client:
        image = {"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [0.5] * (3 * SIZE * SIZE)}
        r = client.post("/v2/models/shapes/infer", json={"inputs": [image], "outputs": [
            {"name": "scores", "parameters": {"classification": 1}}]})
        assert r.status_code == 400, r.text
        assert "this model has no output of one score per class to rank" in r.json()["error"]


def test_server_metadata_reports_the_same_extensions_over_http_and_grpc(live_server):
    import httpx

    port = free_port()
    srv = live_server(grpc_port=port)
    over_http = httpx.get(f"{srv.url}/v2").json()["extensions"]
    assert {"classification", "binary_tensor_data", "model_configuration"} <= set(over_http)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert list(client.get_server_metadata().extensions) == over_http
    finally:
        client.close()


# --- shared memory: not implemented, so refused ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "params", "named"),
    [
        ("output", {"shared_memory_region": "out0", "shared_memory_byte_size": 24},
         "output 'probabilities' has parameters shared_memory_region, shared_memory_byte_size"),
        ("output", {"shared_memory_byte_size": 24, "shared_memory_offset": 8, "binary_data": True},
         "output 'probabilities' has parameters shared_memory_byte_size, shared_memory_offset"),
        ("input", {"shared_memory_region": "in0", "shared_memory_byte_size": 16},
         "input 'text' has parameters shared_memory_region, shared_memory_byte_size"),
    ],
)
def test_shared_memory_parameters_are_400_over_http(make_client, where, params, named):
    """An output asked for in a shared-memory region and answered in the body would leave the client
    reading whatever its region held: the server has no shared-memory extension, so it says so."""
    client = make_client()
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}
    output = {"name": "probabilities"}
    if where == "input":
        text = {**text, "parameters": params}
    else:
        output = {**output, "parameters": params}
    r = client.post(INFER, json={"inputs": [text], "outputs": [output]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert named in error and "does not implement Triton's shared-memory extensions" in error, error
    assert ("ask for the output in the response body" if where == "output" else "send its data in the request") \
        in error, error
    assert client.app.state.metrics.texts._value.get() == 0  # refused before the model ran


def test_shared_memory_is_refused_with_tritonclient_over_http_and_grpc(live_server):
    port = free_port()
    srv = live_server(grpc_port=port)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            out = module.InferRequestedOutput("probabilities")
            out.set_shared_memory("output_region", 3 * 2 * 4)
            with pytest.raises(module.InferenceServerException,
                               match=r"output 'probabilities' has parameters shared_memory_region") as err:
                client.infer(RUN_NAME, [_text_input(module, TEXTS)], outputs=[out])
            assert "ask for the output in the response body" in str(err.value)
            inp = module.InferInput("text", [len(TEXTS)], "BYTES")
            inp.set_shared_memory("input_region", 64, offset=16)
            with pytest.raises(module.InferenceServerException,
                               match=r"input 'text' has parameters shared_memory_region, shared_memory_byte_size, "
                                     r"shared_memory_offset"):
                client.infer(RUN_NAME, [inp])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"  # the gRPC one
        # The same outputs asked for in the body are answered.
        assert grpc.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)]).as_numpy("probabilities").shape == (3, 2)
    finally:
        http.close()
        grpc.close()


# --- 3. binary_data per output ----------------------------------------------------------------------------------
def test_an_outputs_binary_data_overrides_binary_data_output(make_client):
    client = make_client()
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}
    r = client.post(INFER, json={"inputs": [text], "parameters": {"binary_data_output": True},
                                 "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                                             {"name": "truncated"}]})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    by_name = {o["name"]: o for o in header["outputs"]}
    assert by_name["label"]["data"] in ([LABELS[0]], [LABELS[1]]) and "parameters" not in by_name["label"]
    assert by_name["truncated"]["parameters"] == {"binary_data_size": 1} and r.content[n:] == b"\x00"
    # All JSON: no binary part and no header-length header.
    r = client.post(INFER, json={"inputs": [text], "parameters": {"binary_data_output": True},
                                 "outputs": [{"name": "label", "parameters": {"binary_data": False}}]})
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    assert r.headers["content-type"] == "application/json" and "data" in r.json()["outputs"][0]


# --- 4. compression ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers_with_tritonclient(live_server, algorithm):
    srv = live_server()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    texts = TEXTS * 20  # an answer long enough to be worth compressing
    try:
        plain = client.infer(RUN_NAME, [_text_input(httpclient, texts)])
        packed = client.infer(RUN_NAME, [_text_input(httpclient, texts)], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_allclose(packed.as_numpy("probabilities"), plain.as_numpy("probabilities"), atol=1e-6)
        assert packed.as_numpy("label").tolist() == plain.as_numpy("label").tolist()
    finally:
        client.close()


def test_compressed_bodies_raw(make_client):
    client = make_client(max_body_bytes=20_000)
    body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}],
                       "outputs": [{"name": "label"}]}).encode()
    want = client.post(INFER, content=body).json()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                             ("deflate", raw_deflate.compress(body) + raw_deflate.flush()),
                             ("GZip", gzip.compress(body[:20]) + gzip.compress(body[20:])),  # two members
                             ("identity", body)):
        r = client.post(INFER, content=packed, headers={"content-encoding": encoding})
        assert r.status_code == 200 and r.json() == want, (encoding, r.text)
    # A body that inflates past the body limit: 413, though its compressed size is far under it.
    bomb = gzip.compress(b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["'
                         + b"a" * 5_000_000 + b'"]}]}')
    assert len(bomb) < 20_000
    r = client.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates (gzip) to over the 20000-byte limit" in r.json()["error"], r.text
    r = client.post(INFER, content=b"not gzip at all", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip data" in r.json()["error"], r.text
    r = client.post(INFER, content=gzip.compress(body)[:-12], headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "ends early" in r.json()["error"], r.text
    r = client.post(INFER, content=body, headers={"content-encoding": "br"})
    assert r.status_code == 415 and "Content-Encoding br is not one this server reads" in r.json()["error"], r.text


def test_answers_are_compressed_when_the_client_accepts_it(make_client):
    client = make_client()
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS * 20)], "datatype": "BYTES", "data": TEXTS * 20}]}
    for accept, encoding in (("gzip", "gzip"), ("deflate;q=0.5, gzip;q=0", "deflate"), ("br, gzip", "gzip")):
        r = client.post(INFER, json=body, headers={"accept-encoding": accept})
        assert r.status_code == 200 and r.headers["content-encoding"] == encoding, (accept, r.headers)
        assert r.json()["outputs"][0]["shape"] == [60, 2]  # httpx inflated it
    r = client.post(INFER, json=body, headers={"accept-encoding": "identity"})
    assert "content-encoding" not in r.headers
    small = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    assert "content-encoding" not in client.post(INFER, json=small, headers={"accept-encoding": "gzip"}).headers


def test_big_answers_are_compressed_off_the_event_loop():
    import asyncio

    from edgekd.serving.api_v2 import COMPRESS_INLINE_BYTES, _compress

    big = bytes(range(256)) * (COMPRESS_INLINE_BYTES // 128)
    assert gzip.decompress(asyncio.run(_compress(big, "gzip"))) == big
    assert zlib.decompress(asyncio.run(_compress(big, "deflate"))) == big


# --- 5. and 6. the model configuration ----------------------------------------------------------------------------
def test_model_config_marks_optional_inputs_and_rank1_outputs(make_client):
    client = make_client()
    config = client.get(f"/v2/models/{RUN_NAME}/config").json()
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["text"] == {"name": "text", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []},
                              "optional": True}
    assert inputs["input_ids"] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1], "optional": True}
    assert all(i["optional"] for i in config["input"])  # text, or the token tensors: none is always sent
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["probabilities"] == {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]}
    for name in ("label", "truncated"):  # [batch] answers: dims [1] reshaped to [], as Triton writes them
        assert outputs[name]["dims"] == [1] and outputs[name]["reshape"] == {"shape": []}
    # What the config says is what the server answers: label is [batch].
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES",
                                             "data": [["a"], ["b"]]}], "outputs": [{"name": "label"}]})
    assert r.json()["outputs"][0]["shape"] == [2]


def test_detector_config_keeps_its_input_required(tmp_path):
    from fastapi.testclient import TestClient
    from test_serve_detection import export_tiny_detector

    from edgekd.serving import ServeSettings, create_app

    folder = export_tiny_detector(tmp_path / "shapes" / "export" / "onnx")
    with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)) as client:
        config = client.get("/v2/models/shapes/config").json()
    assert [("optional" in i, "reshape" in i) for i in config["input"]] == [(False, False)]


def test_grpc_model_config_is_the_http_one(live_server):
    import httpx

    port = free_port()
    srv = live_server(grpc_port=port)
    want = httpx.get(f"{srv.url}/v2/models/{RUN_NAME}/config").json()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        got = client.get_model_config(RUN_NAME, as_json=True)["config"]
        got_v1 = client.get_model_config(RUN_NAME, "1")
        with pytest.raises(grpcclient.InferenceServerException, match="unknown model 'bert'") as err:
            client.get_model_config("bert")
        assert err.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()
    assert got_v1.config.name == RUN_NAME and got_v1.config.max_batch_size == want["max_batch_size"]

    def as_ints(tensor):  # protobuf's JSON writes int64 as strings and leaves out empty lists
        out = {**tensor, "dims": [int(d) for d in tensor["dims"]]}
        if "reshape" in out:
            out["reshape"] = {"shape": [int(d) for d in out["reshape"].get("shape", [])]}
        return out

    assert {k: got[k] for k in ("name", "platform", "backend", "max_batch_size", "parameters")} == {
        k: want[k] for k in ("name", "platform", "backend", "max_batch_size", "parameters")}
    for key in ("input", "output"):
        assert [as_ints(t) for t in got[key]] == want[key], key


def test_model_config_messages_match_tritons():
    """The ModelConfig messages of the descriptor table have the numbers and types of tritonclient's
    model_config.proto, and DataType the same values."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    from edgekd.serving.grpc_v2 import ENUMS, message_classes

    ours = message_classes()
    for name in ("ModelConfigRequest", "ModelConfigResponse", "ModelConfig", "ModelInput", "ModelOutput",
                 "ModelTensorReshape", "ModelParameter"):
        theirs = (service_pb2.DESCRIPTOR.message_types_by_name.get(name)
                  or model_config_pb2.DESCRIPTOR.message_types_by_name[name])
        for field in ours[name].DESCRIPTOR.fields:
            other = theirs.fields_by_name[field.name]
            assert (other.number, other.type, other.is_repeated) == (field.number, field.type, field.is_repeated), \
                (name, field.name)
    values = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values
    assert [(v.name, v.number) for v in values] == list(zip(ENUMS["DataType"], range(len(values)), strict=True))


# --- readiness ------------------------------------------------------------------------------------------------------
def test_grpc_model_ready_is_false_while_not_ready(live_server):
    """Shutting down (or loading), gRPC ModelReady answers ready=false, as HTTP's {"ready": false}: not an error."""
    import httpx

    port = free_port()
    srv = live_server(grpc_port=port)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_model_ready(RUN_NAME)
        srv.app.state.ready = False  # what the lifespan sets when shutdown begins
        try:
            assert httpx.get(f"{srv.url}/v2/models/{RUN_NAME}/ready").json() == {"ready": False}
            assert client.is_model_ready(RUN_NAME) is False
            assert client.is_server_ready() is False
        finally:
            srv.app.state.ready = True
    finally:
        client.close()


# --- 7. duplicates and integer ranges ---------------------------------------------------------------------------
def test_an_output_requested_twice_is_400(make_client, live_server):
    client = make_client()
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}],
                                 "outputs": [{"name": "label"}, {"name": "probabilities"}, {"name": "label"}]})
    assert r.status_code == 400 and "output(s) ['label'] are requested more than once" in r.json()["error"], r.text
    port = free_port()
    live_server(grpc_port=port)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpcclient.InferenceServerException, match="requested more than once") as err:
            grpc.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)],
                       outputs=[grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("logits")])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        grpc.close()


@pytest.mark.parametrize(
    ("datatype", "value", "bounds"),
    [("INT8", 300, "[-128, 127]"), ("INT8", -129, "[-128, 127]"), ("INT16", 40_000, "[-32768, 32767]"),
     ("INT32", 2**31, "[-2147483648, 2147483647]"), ("UINT8", -1, "[0, 255]"), ("UINT16", 70_000, "[0, 65535]")],
)
@pytest.mark.parametrize("name", ["input_ids", "attention_mask"])
def test_json_integers_outside_their_datatype_are_400(make_client, datatype, value, bounds, name):
    client = make_client()
    tensors = {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}
    tensors[name] = [tensors[name][0], value, tensors[name][2]]
    body = {"inputs": [{"name": n, "shape": [1, 3], "datatype": datatype, "data": d} for n, d in tensors.items()]}
    r = client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    assert f"input '{name}' holds values outside {datatype.lower()}'s range {bounds}" in r.json()["error"], r.text


def test_integers_checks_the_declared_datatype():
    from edgekd.serving.errors import RequestError
    from edgekd.serving.v2_core import Tensor, integers

    assert integers(Tensor("x", "INT8", [2], [-128, 127])).tolist() == [-128, 127]
    with pytest.raises(RequestError, match=r"input 'x' holds values outside int8's range \[-128, 127\]"):
        integers(Tensor("x", "INT8", [1], [300]))
    with pytest.raises(RequestError, match=r"over 9223372036854775807 \(int64's range\)"):
        integers(Tensor("x", "UINT64", [1], [2**63]))  # a UINT64 value, but not one int64 inputs hold


# --- 2. texts without content ---------------------------------------------------------------------------------
INVISIBLE = ["\u200b", "\ufeff", "\x00", "\u00ad", "\u200b\u200c\u200d", " \u200b\t", "\u0301", "[SEP]"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_text_the_tokenizer_keeps_nothing_of_is_refused(make_client, text):
    client = make_client()
    r = client.post("/predict", json={"text": text})  # the middleware's fast path
    assert r.status_code == 422 and r.json()["error"].startswith("text has no content the tokenizer keeps"), r.text
    r = client.post("/predict", json={"texts": ["fine", text]})
    assert r.status_code == 422 and r.json()["error"].startswith("texts[1] has no content the tokenizer keeps"), r.text
    r = client.post(INFER, json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                             "data": ["fine", text]}]})
    assert r.status_code == 422 and r.json()["error"].startswith("texts[1] has no content the tokenizer keeps"), r.text
    assert client.app.state.metrics.texts._value.get() == 0  # refused before the model ran


def test_text_with_content_among_invisible_characters_is_classified(make_client):
    client = make_client()
    for text in ("ok\u200b", "\ufeffgood", "☃"):  # the snowman is not in the vocabulary: [UNK] is content
        assert client.post("/predict", json={"text": text}).status_code == 200, text


def test_local_predict_refuses_text_without_content(export_dir):
    from edgekd.api import Model
    from edgekd.errors import DataError
    from edgekd.serving import ServeSettings
    from edgekd.serving.model import load_served_model

    model = Model(load_served_model(ServeSettings(export_dir=export_dir), ort_loader))
    with pytest.raises(DataError, match=r"text 1 has no visible characters, only control or format ones such as "
                                        r"U\+00AD, U\+200B"):
        model.predict(["fine", "\u200b\u00ad"])
    with pytest.raises(DataError, match="text 2 has no content the tokenizer keeps"):
        model.predict(["fine", "good", "[SEP]"], batch_size=2)
    assert [p.label for p in model.predict(["fine", "ok\u200b"])] == [p.label for p in model.predict(["fine", "ok"])]


def test_require_texts_refuses_invisible_texts():
    from edgekd.errors import DataError
    from edgekd.tasks.text.checks import require_texts

    require_texts(["fine", "ok\u200b"], "give text")
    for text in ("\u200b", "\ufeff\u200d", "\x00", "\u00ad"):
        with pytest.raises(DataError, match="text 0 has no visible characters"):
            require_texts([text], "give text")
