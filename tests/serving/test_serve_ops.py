"""/health, /metadata, /metrics, and what the server checks before it serves anything."""

from __future__ import annotations

import json

import pytest
from serve_helpers import RUN_NAME, ort_loader

from edgekd.errors import ChecksumError, StageError
from edgekd.serving import ServeSettings, create_app, serve
from edgekd.serving.model import resolve_export_dir


def test_health(make_client):
    r = make_client().get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": RUN_NAME, "target": "onnx"}


def test_metadata_reports_artifact_and_run_figures(make_client, export_dir):
    r = make_client(threads=1).get("/metadata")
    assert r.status_code == 200, r.text
    meta = r.json()
    artifact = json.loads((export_dir / "artifact.json").read_text())
    assert meta["model"] == RUN_NAME and meta["target"] == "onnx"
    assert meta["labels"] == ["negative", "positive"] and meta["max_length"] == 32
    assert meta["artifact"]["sha256"] == artifact["sha256"]
    assert meta["artifact"]["parity"] == {"max_abs_diff": 1e-6, "top1_agreement": 1.0}
    assert meta["run"]["eval"] == {"student": {"accuracy": 0.75}}
    assert meta["run"]["export"] == {"top1_agreement": 1.0, "max_abs_diff": 1e-6}
    assert meta["runtime"]["runner"] == "OrtRunner"
    assert meta["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert meta["batching"]["enabled"] is False
    assert "onnxruntime" in meta["versions"] and "torch" not in meta["versions"]


def test_metrics_count_routes_statuses_batches_and_errors(make_client):
    client = make_client()
    client.post("/predict", json={"texts": ["fine", "good"]})
    client.post("/predict", json={"text": ""})
    client.get("/nope")
    text = client.get("/metrics").text
    assert 'edgekd_http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'edgekd_http_requests_total{method="POST",route="/predict",status="422"} 1.0' in text
    assert 'edgekd_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'edgekd_http_request_duration_seconds_count{route="/predict"} 2.0' in text
    # warm-up runs before the engine exists, so only the request's batch of 2 is counted
    assert "edgekd_inference_batch_size_count 1.0" in text
    assert "edgekd_inference_batch_size_sum 2.0" in text
    assert 'edgekd_errors_total{kind="bad_request"} 1.0' in text
    assert "edgekd_texts_total 2.0" in text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_bodies_over_the_limit_are_counted_under_the_route_requested(make_client):
    client = make_client(max_body_bytes=100)
    big = {"text": "good " * 50}
    for path in ("/predict", f"/v2/models/{RUN_NAME}/infer", f"/v2/models/{RUN_NAME}/versions/1/infer", "/nope"):
        assert client.post(path, json=big).status_code == 413, path
    assert client.put("/predict", json=big).status_code == 413  # the route the app would answer 405
    text = client.get("/metrics").text
    assert 'edgekd_http_requests_total{method="POST",route="/predict",status="413"} 1.0' in text
    assert 'edgekd_http_requests_total{method="PUT",route="/predict",status="413"} 1.0' in text
    assert 'edgekd_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="413"} 1.0' in text
    assert ('edgekd_http_requests_total{method="POST",route="/v2/models/{name}/versions/{version}/infer",'
            'status="413"} 1.0') in text
    # An unknown path keeps the one label value, so a client cannot grow the label set.
    assert 'edgekd_http_requests_total{method="POST",route="unmatched",status="413"} 1.0' in text
    assert 'edgekd_errors_total{kind="too_large"} 5.0' in text
    # Within the limit, the app counts the same routes as the refusals are counted under.
    client.put("/predict", json={"text": "fine"})
    client.post(f"/v2/models/{RUN_NAME}/versions/1/infer", json={})
    text = client.get("/metrics").text
    assert 'edgekd_http_requests_total{method="PUT",route="/predict",status="405"} 1.0' in text
    assert ('edgekd_http_requests_total{method="POST",route="/v2/models/{name}/versions/{version}/infer",'
            'status="422"} 1.0') in text


def test_two_apps_share_no_metrics(make_client):
    a, b = make_client(), make_client()
    a.post("/predict", json={"text": "fine"})
    assert "edgekd_texts_total 1.0" in a.get("/metrics").text
    assert "edgekd_texts_total 0.0" in b.get("/metrics").text


# --- what is served ----------------------------------------------------------------------------------
def test_resolve_export_dir(run_dir, export_dir, tmp_path):
    assert resolve_export_dir(run_dir, "onnx") == run_dir / "export" / "onnx"
    assert resolve_export_dir(run_dir) == run_dir / "export" / "onnx"  # the only export
    assert resolve_export_dir(export_dir) == export_dir
    assert resolve_export_dir(export_dir, "onnx") == export_dir  # its own name: the same folder
    with pytest.raises(StageError, match=r"is an export folder itself, so target 'onnx-int8' \(which picks an export "
                                         r"of a run folder\) would choose nothing"):
        resolve_export_dir(export_dir, "onnx-int8")  # the onnx folder would be served
    with pytest.raises(StageError, match="has no export 'onnx-int8'; exports there: onnx"):
        resolve_export_dir(run_dir, "onnx-int8")
    with pytest.raises(StageError, match="holds no exported artifact"):
        resolve_export_dir(tmp_path)
    with pytest.raises(StageError, match="does not exist"):
        resolve_export_dir(tmp_path / "missing")


def test_several_exports_need_a_target(run_copy):
    import shutil

    shutil.copytree(run_copy / "export" / "onnx", run_copy / "export" / "onnx-int8")
    with pytest.raises(StageError, match=r"several exports \(onnx, onnx-int8\): choose one with --target"):
        resolve_export_dir(run_copy)


def _start(folder):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)):
        pass


def test_tampered_artifact_is_refused(run_copy):
    folder = run_copy / "export" / "onnx"
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match=r"refusing to serve .*model.onnx: its sha256 is \w+ but artifact.json"):
        _start(folder)


def test_artifact_not_matching_the_manifest_is_refused(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["stages"]["export"]["artifacts"]["export/onnx/model.onnx"] = "0" * 64
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChecksumError, match="export/onnx/model.onnx does not match the sha256 that .*manifest.json"):
        _start(run_copy / "export" / "onnx")


def test_artifact_json_without_sha256_is_refused(run_copy):
    path = run_copy / "export" / "onnx" / "artifact.json"
    meta = json.loads(path.read_text())
    del meta["sha256"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ChecksumError, match="records no sha256"):
        _start(path.parent)


def test_serve_refuses_before_listening(run_copy):
    with open(run_copy / "export" / "onnx" / "model.onnx", "ab") as f:
        f.write(b"\0")
    from serve_helpers import free_port

    settings = ServeSettings(port=free_port(), log_level="critical")
    with pytest.raises(ChecksumError, match="re-export this target"):
        serve(run_copy, "onnx", settings, loader=ort_loader)


def test_settings_from_the_recipe_section():
    from edgekd.recipe import ServeConfig

    cfg = ServeConfig(target="onnx-int8", port=9000, batching=True, max_batch_size=16, overflow="reject")
    s = ServeSettings.from_config(cfg, threads=2)
    assert (s.port, s.batching, s.max_batch_size, s.overflow, s.threads) == (9000, True, 16, "reject", 2)


def test_batch_settings_without_batching_are_refused_naming_where_they_came_from(monkeypatch):
    from edgekd.recipe import ServeConfig
    from edgekd.serving.settings import SettingsError

    why = "shape the micro-batches of concurrent requests, and batching is off: turn batching on, or unset them"
    with pytest.raises(SettingsError) as e:
        ServeSettings.from_config(ServeConfig(max_batch_size=8, max_wait_ms=5))
    assert str(e.value) == f"invalid server setting: serve.max_batch_size=8 (recipe): max_batch_size, max_wait_ms: {why}"
    monkeypatch.setenv("EDGEKD_SERVE_MAX_WAIT_MS", "5")
    with pytest.raises(SettingsError, match="EDGEKD_SERVE_MAX_WAIT_MS=.*max_wait_ms: shapes the micro-batches"):
        ServeSettings.from_config(ServeConfig(), batching=False)
    # read once batching is on, from a flag over the recipe
    s = ServeSettings.from_config(ServeConfig(max_batch_size=8), batching=True)
    assert (s.batching, s.max_batch_size, s.max_wait_ms) == (True, 8, 5)


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGEKD_SERVE_BATCHING", "true")
    monkeypatch.setenv("EDGEKD_SERVE_MAX_WAIT_MS", "5")
    s = ServeSettings()
    assert s.batching is True and s.max_wait_ms == 5
    assert "s3cret" not in repr(ServeSettings(api_key="s3cret"))


def test_serve_raises_the_load_error_when_startup_fails(run_copy):
    from serve_helpers import free_port

    def broken_loader(folder, **opts):
        raise StageError("the runtime cannot open this artifact")

    settings = ServeSettings(port=free_port(), log_level="critical")
    with pytest.raises(StageError, match="cannot open this artifact"):
        serve(run_copy, "onnx", settings, loader=broken_loader)


class FailingRunner:
    """A runner whose runtime fails on every call (e.g. a device lost mid-run)."""

    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]

    def run(self, inputs):
        raise RuntimeError("CUDA error: device lost")


def test_runner_failure_is_a_json_500_and_the_server_stays_up(make_client):
    from edgekd.serving.context import Serving, get_serving

    client = make_client()
    real: Serving = client.app.state.serving
    engine = type(real.engine)(FailingRunner(), real.model.codec)

    async def failing() -> Serving:
        if not engine._executor:
            await engine.start()
        return Serving(settings=real.settings, model=real.model, engine=engine, metrics=real.metrics)

    from fastapi.testclient import TestClient

    client.app.dependency_overrides[get_serving] = failing
    # As over real HTTP: the 500 is sent and the error logged, not raised into the client.
    r = TestClient(client.app, raise_server_exceptions=False).post("/predict", json={"text": "fine"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (RuntimeError); the server log has the details."}
    assert 'edgekd_errors_total{kind="internal"} 1.0' in client.get("/metrics").text
    client.app.dependency_overrides.clear()
    assert client.post("/predict", json={"text": "fine"}).status_code == 200
    engine._executor.shutdown()


def test_routes_answer_503_before_the_model_is_loaded(export_dir):
    from fastapi.testclient import TestClient

    # Without entering the client's context the lifespan never runs: nothing is loaded.
    client = TestClient(create_app(ServeSettings(export_dir=export_dir), loader=ort_loader))
    for r in (client.post("/predict", json={"text": "fine"}), client.get("/health"), client.get("/metadata")):
        assert r.status_code == 503
        assert "not loaded" in r.json()["error"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 400  # the protocol's "false"


def test_module_entry_point_reports_errors(tmp_path, capsys):
    from edgekd.serving.__main__ import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_changed_file_listed_in_artifact_json_is_refused(run_copy):
    """External weights (model.onnx.data) are part of the artifact: artifact.json's ``files``."""
    from edgekd.export.base import write_artifact_meta
    from edgekd.runfolder import sha256_file

    folder = run_copy / "export" / "onnx"
    (folder / "model.onnx.data").write_bytes(b"weights")
    meta = json.loads((folder / "artifact.json").read_text())
    meta["files"] = {"model.onnx": meta["sha256"], "model.onnx.data": sha256_file(folder / "model.onnx.data")}
    write_artifact_meta(folder, meta)
    _start(folder)  # intact: serves
    (folder / "model.onnx.data").write_bytes(b"other weights")
    with pytest.raises(ChecksumError, match=r"model.onnx.data: its sha256 is \w+ but artifact.json records"):
        _start(folder)
