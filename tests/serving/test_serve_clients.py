"""Standard Open Inference Protocol clients, unmodified, against the live server: tritonclient.http
in its default binary mode (no Content-Type, binary tensors both ways), and tritonclient.grpc."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import LABELS, RUN_NAME, free_port, slow_loader

from edgekd.serving.codec import softmax

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the dev extra)")

TEXTS = ["a good film", "dull and boring", "fine ✓ naïve"]


def _text_input(module, texts):
    inp = module.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.asarray([t.encode() for t in texts], dtype=object))  # binary_data=True
    return inp


def _check(result, reference, texts):
    want = softmax(np.stack([reference(t) for t in texts]))
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(texts), 2)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert [x.decode() for x in result.as_numpy("label")] == [LABELS[k] for k in want.argmax(1)]
    assert result.as_numpy("truncated").tolist() == [False] * len(texts)


def test_tritonclient_http_binary_default(live_server, reference):
    srv = live_server()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(RUN_NAME)
        assert client.is_model_ready(RUN_NAME, "1")
        meta = client.get_model_metadata(RUN_NAME)
        assert meta["versions"] == ["1"] and {"name": "text", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
        config = client.get_model_config(RUN_NAME, "1")
        assert config["name"] == RUN_NAME and {"name": "text", "data_type": "TYPE_STRING", "dims": [1],
                                               "reshape": {"shape": []}, "optional": True} in config["input"]
        # Default request: binary inputs, and no outputs named, so all of them come back binary.
        result = client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)], request_id="7")
        assert result.get_response()["id"] == "7"
        assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
        _check(result, reference, TEXTS)
        # Named outputs, versioned route: one binary, one as JSON.
        outs = [httpclient.InferRequestedOutput("probabilities"),
                httpclient.InferRequestedOutput("label", binary_data=False)]
        result = client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)], model_version="1", outputs=outs)
        by_name = {o["name"]: o for o in result.get_response()["outputs"]}
        want = softmax(np.stack([reference(t) for t in TEXTS]))
        assert by_name["label"]["data"] == [LABELS[k] for k in want.argmax(1)]  # JSON
        assert by_name["probabilities"]["parameters"]["binary_data_size"] == want.size * 4  # binary
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)
        # Token tensors, binary INT64.
        ids = np.asarray([[2, 5, 7, 3]], dtype=np.int64)
        inputs = [httpclient.InferInput("input_ids", [1, 4], "INT64"),
                  httpclient.InferInput("attention_mask", [1, 4], "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        assert client.infer(RUN_NAME, inputs).as_numpy("logits").shape == (1, 2)
        # A refusal arrives as the client's exception carrying the server's message.
        with pytest.raises(Exception, match="unknown model 'bert'"):
            client.infer("bert", [_text_input(httpclient, TEXTS)])
        with pytest.raises(Exception, match="no version '2'"):
            client.infer(RUN_NAME, [_text_input(httpclient, TEXTS)], model_version="2")
    finally:
        client.close()


def test_tritonclient_grpc(live_server, reference):
    port = free_port()
    live_server(grpc_port=port)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(RUN_NAME)
        meta = client.get_model_metadata(RUN_NAME, as_json=True)
        assert meta["name"] == RUN_NAME and meta["versions"] == ["1"]
        assert {"name": "text", "datatype": "BYTES", "shape": ["-1"]} in meta["inputs"]
        assert client.get_server_metadata(as_json=True)["name"] == "edgekd"
        result = client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)], request_id="9")
        assert result.get_response().id == "9"
        _check(result, reference, TEXTS)
        outs = [grpcclient.InferRequestedOutput("label")]
        result = client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS[:1])], model_version="1", outputs=outs)
        assert [o.name for o in result.get_response().outputs] == ["label"]
        with pytest.raises(grpcclient.InferenceServerException, match="unknown model 'bert'") as err:
            client.infer("bert", [_text_input(grpcclient, TEXTS)])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        bad = grpcclient.InferInput("input_ids", [1, 1], "UINT64")
        bad.set_data_from_numpy(np.asarray([[2**64 - 1]], dtype=np.uint64))
        mask = grpcclient.InferInput("attention_mask", [1, 1], "INT64")
        mask.set_data_from_numpy(np.ones((1, 1), dtype=np.int64))
        with pytest.raises(grpcclient.InferenceServerException, match="int64's range") as err:
            client.infer(RUN_NAME, [bad, mask])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_grpc_calls_are_counted_in_metrics(live_server):
    """/metrics counts gRPC calls and their latency, as it does HTTP requests, by RPC and status."""
    import httpx

    port = free_port()
    srv = live_server(grpc_port=port)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()
        assert client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)]).as_numpy("label").shape == (3,)
        with pytest.raises(grpcclient.InferenceServerException, match="unknown model 'bert'"):
            client.infer("bert", [_text_input(grpcclient, TEXTS)])
    finally:
        client.close()
    text = httpx.get(f"{srv.url}/metrics").text
    infer = "/inference.GRPCInferenceService/ModelInfer"
    assert 'edgekd_http_requests_total{method="GRPC",route="/inference.GRPCInferenceService/ServerLive",' \
           'status="OK"} 1.0' in text
    assert f'edgekd_http_requests_total{{method="GRPC",route="{infer}",status="OK"}} 1.0' in text
    assert f'edgekd_http_requests_total{{method="GRPC",route="{infer}",status="NOT_FOUND"}} 1.0' in text
    assert f'edgekd_http_request_duration_seconds_count{{route="{infer}"}} 2.0' in text
    assert 'edgekd_errors_total{kind="not_found"} 1.0' in text and "edgekd_texts_total 3.0" in text


def test_grpc_calls_count_in_flight_as_http_posts_do(live_server):
    """A ModelInfer call in progress counts in the in-flight gauge that the engine's batcher reads (its
    arrivals), as an HTTP POST does, and leaves it when it ends, answered or refused."""
    import threading

    import httpx

    port = free_port()
    srv = live_server(loader=slow_loader(1.0), grpc_port=port)  # each runner call takes a second
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    answers = []
    try:
        call = threading.Thread(target=lambda: answers.append(client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)])))
        call.start()
        srv.wait_in_flight(1, timeout=15)
        assert srv.app.state.serving.engine._arrivals() == 1  # what the batcher counts
        assert "edgekd_http_inference_requests_in_flight 1.0" in httpx.get(f"{srv.url}/metrics").text
        call.join(timeout=30)
        assert answers and answers[0].as_numpy("label").shape == (3,)
        assert srv.app.state.metrics.in_flight() == 0
        with pytest.raises(grpcclient.InferenceServerException, match="unknown model 'bert'"):
            client.infer("bert", [_text_input(grpcclient, TEXTS)])
        assert client.is_server_live()  # health calls are not inference: never counted
    finally:
        client.close()
    assert srv.app.state.metrics.in_flight() == 0
    assert "edgekd_http_inference_requests_in_flight 0.0" in httpx.get(f"{srv.url}/metrics").text


def test_grpc_needs_the_api_key(live_server):
    port = free_port()
    live_server(grpc_port=port, api_key="s3cret")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()  # health needs no key, as on HTTP
        with pytest.raises(grpcclient.InferenceServerException, match="needs an API key") as err:
            client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer(RUN_NAME, [_text_input(grpcclient, TEXTS)], headers={"x-api-key": "s3cret"})
        assert result.as_numpy("probabilities").shape == (3, 2)
    finally:
        client.close()


def test_grpc_messages_match_tritons(live_server):
    """The descriptor table is the protocol: every field it declares has the same number and type in
    the messages tritonclient itself compiled from Triton's grpc_service.proto (a superset of KServe's)
    and model_config.proto (ModelConfig)."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    from edgekd.serving.grpc_v2 import MESSAGES, message_classes

    ours = message_classes()
    for name in MESSAGES:
        mine = ours[name].DESCRIPTOR
        outer = name.split(".")[0]
        theirs = (service_pb2.DESCRIPTOR.message_types_by_name.get(outer)
                  or model_config_pb2.DESCRIPTOR.message_types_by_name[outer])
        if "." in name:
            theirs = theirs.nested_types_by_name[name.split(".")[1]]
        for field in mine.fields:
            other = theirs.fields_by_name[field.name]
            assert (other.number, other.type, other.is_repeated) == (field.number, field.type, field.is_repeated), (name, field.name)


def test_grpc_undecodable_request_is_invalid_argument(live_server):
    import grpc

    port = free_port()
    live_server(grpc_port=port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=10)  # not a ModelInferRequest
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInfer message" in err.value.details()
