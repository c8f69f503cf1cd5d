"""Detection exports through the same server: images in (multipart or base64), boxes in original pixels out.

The "detector" is an ONNX graph built with onnx.helper (no training, milliseconds to build) whose
outputs are known exactly: fixed boxes in letterboxed pixels, fixed scores, plus one box whose
score is the image's mean brightness, so results depend on which image went in (batching checks).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import LiveServer, ort_loader

from edgekd.export.base import write_artifact_meta
from edgekd.runfolder import sha256_file

SIZE = 64
LABELS = ["square", "circle"]
# Letterboxed-pixel boxes (S=64). A 200x100 image is scaled by 0.32 and padded 16 px top and bottom.
BOXES = np.array([[5, 21, 37, 37], [6, 22, 38, 38], [40, 20, 60, 40]], dtype=np.float32)
SCORES = np.array([[0.9, 0.05], [0.8, 0.05], [0.0, 0.0]], dtype=np.float32)  # anchor 2's class 1: brightness
# Anchors 0 and 2 in the original 200x100 image (anchor 1 overlaps anchor 0: IoU 0.83, dropped by NMS).
BOX0 = [15.625, 15.625, 115.625, 65.625]
BOX2 = [125.0, 12.5, 187.5, 75.0]
PAD = 114 / 255
WHITE_SCORE = 0.5 + 0.5 * PAD  # mean of a letterboxed white 2:1 image: half image, half border
NMS_ROWS = np.array([[5, 21, 37, 37, 0.9, 1], [0, 0, 0, 0, 0, 0]], dtype=np.float32)


def _build_onnx(path: Path, nms_in_graph: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray):
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["mean", "axes12"], ["m"]),  # [B,1,1]
        helper.make_node("Mul", ["m", "zero"], ["z"]),
    ]
    inits = [const("axes12", np.array([1, 2], np.int64)), const("zero", np.float32(0))]
    if nms_in_graph:
        nodes.append(helper.make_node("Add", ["z", "rows"], ["detections"]))
        inits.append(const("rows", NMS_ROWS[None]))
        outputs = [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", 2, 6])]
    else:
        weight = np.zeros((1, 3, 2), np.float32)
        weight[0, 2, 1] = 1.0
        nodes += [
            helper.make_node("Add", ["z", "box_const"], ["boxes"]),
            helper.make_node("Mul", ["m", "weight"], ["mw"]),
            helper.make_node("Add", ["mw", "score_const"], ["scores"]),
        ]
        inits += [const("box_const", BOXES[None]), const("weight", weight), const("score_const", SCORES[None])]
        outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 3, 4]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3, 2])]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    graph = helper.make_graph(nodes, "tiny_detector", [images], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_tiny_detector(out_dir: Path, nms_in_graph: bool = False, **meta) -> Path:
    """An export folder as the export stage writes it for a detection task."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    _build_onnx(path, nms_in_graph)
    outputs = ["detections"] if nms_in_graph else ["boxes", "scores"]
    write_artifact_meta(out_dir, {
        "target": "onnx", "exporter": "onnx", "file": "model.onnx", "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size, "precision": "fp32", "files": {"model.onnx": sha256_file(path)},
        "io": {"input_names": ["images"], "output_names": outputs,
               "dynamic_axes": {n: {"0": "batch"} for n in ["images", *outputs]}, "dtypes": {"images": "float32"}},
        "labels": LABELS, "image_size": SIZE, "input": "image", "task": "detection", **meta,
    })
    return out_dir


def png(w: int = 200, h: int = 100, value: int = 255) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(w: int = 200, h: int = 100, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (w, h), (255, 255, 255))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


WHITE, BLACK = png(), png(value=0)


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory) -> Path:
    return export_tiny_detector(tmp_path_factory.mktemp("det") / "shapes" / "export" / "onnx")


@pytest.fixture(scope="module")
def client(det_dir):
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    app = create_app(ServeSettings(export_dir=det_dir, max_images=4, max_image_pixels=1_000_000), loader=ort_loader)
    with TestClient(app) as c:
        yield c


def _boxes(pred: dict) -> list[tuple[str, list[float]]]:
    return [(d["label"], d["box"]) for d in pred["detections"]]


def test_multipart_file_gives_boxes_in_original_pixels(client):
    r = client.post("/predict", files={"file": ("wide.png", WHITE, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "shapes" and body["target"] == "onnx"
    [pred] = body["predictions"]
    assert (pred["width"], pred["height"]) == (200, 100)
    assert _boxes(pred) == [("square", BOX0), ("circle", BOX2)]
    assert [d["class_id"] for d in pred["detections"]] == [0, 1]
    assert pred["detections"][0]["score"] == pytest.approx(0.9)
    assert pred["detections"][1]["score"] == pytest.approx(WHITE_SCORE, abs=1e-4)


def test_several_files_keep_order_and_their_own_results(client):
    files = [("files", ("a.png", WHITE, "image/png")), ("files", ("b.png", BLACK, "image/png")),
             ("files", ("c.png", WHITE, "application/octet-stream"))]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    # The black image is darker than conf_threshold 0.25 on anchor 2: only the fixed box remains.
    assert [len(p["detections"]) for p in r.json()["predictions"]] == [2, 1, 2]


def test_base64_json_matches_multipart(client):
    want = client.post("/predict", files={"file": ("x.png", WHITE, "image/png")}).json()["predictions"]
    b64 = base64.b64encode(WHITE).decode()
    r = client.post("/predict", json={"image": b64})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == want
    r = client.post("/predict", json={"images": [f"data:image/png;base64,{b64}", base64.b64encode(BLACK).decode()]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0] == want[0] and len(preds[1]["detections"]) == 1


def test_compressed_multipart_and_json_bodies_match_plain_ones(client):
    """A gzip or deflate body (Content-Encoding) is inflated before the form or JSON is read."""
    import gzip
    import zlib

    form = httpx.Request("POST", "http://test/predict", files=[("files", ("a.png", WHITE, "image/png")),
                                                               ("files", ("b.png", BLACK, "image/png"))],
                         data={"max_det": "1"})
    body, content_type = form.read(), form.headers["content-type"]
    want = client.post("/predict", content=body, headers={"content-type": content_type})
    assert want.status_code == 200, want.text
    assert [len(p["detections"]) for p in want.json()["predictions"]] == [1, 1]
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = client.post("/predict", content=packed, headers={"content-type": content_type,
                                                             "content-encoding": encoding})
        assert r.status_code == 200, (encoding, r.text)
        assert r.json() == want.json(), encoding
    as_json = json.dumps({"image": base64.b64encode(WHITE).decode()}).encode()
    want = client.post("/predict", content=as_json, headers={"content-type": "application/json"}).json()
    r = client.post("/predict", content=gzip.compress(as_json),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 200 and r.json() == want, r.text


def test_options_from_query_form_and_json(client):
    b64 = base64.b64encode(WHITE).decode()
    r = client.post("/predict?conf_threshold=0.85", files={"file": ("x.png", WHITE)})
    assert _boxes(r.json()["predictions"][0]) == [("square", BOX0)]
    r = client.post("/predict", json={"image": b64, "iou_threshold": 0.9})  # anchor 1 survives NMS
    assert [d["score"] for d in r.json()["predictions"][0]["detections"]][:2] == pytest.approx([0.9, 0.8])
    r = client.post("/predict", files={"file": ("x.png", WHITE)}, data={"max_det": "1"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["detections"]) == 1


def test_exif_orientation_is_applied(client):
    r = client.post("/predict", files={"file": ("rotated.jpg", jpeg(orientation=6), "image/jpeg")})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert (pred["width"], pred["height"]) == (100, 200)  # stored 200x100, shown rotated by 90 degrees


def _truncated_jpeg() -> bytes:
    data = jpeg(400, 300)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 422,
         "files[0] (a.txt) is not an image this server reads"),
        ({"files": {"file": ("a.png", WHITE[: len(WHITE) // 2], "image/png")}}, 422, "truncated or corrupt"),
        ({"files": {"file": ("a.jpg", _truncated_jpeg(), "image/jpeg")}}, 422, "truncated or corrupt"),
        ({"files": {"file": ("a.png", b"", "image/png")}}, 422, "files[0] (a.png) is empty"),
        ({"files": [("files", ("a.png", WHITE))] * 5}, 422, "5 images in one request; this server takes at most 4"),
        ({"files": {"file": ("big.png", png(2000, 1000))}}, 413, "2000x1000 = 2000000 pixels"),
        ({"content": WHITE, "headers": {"content-type": "image/png"}}, 415, "this model takes images"),
        ({"json": {"text": "a cat"}}, 422, "this model detects objects in images and takes no texts"),
        ({"json": {"image": "not base64!"}}, 422, "image is not valid base64"),
        ({"json": {"image": "data:image/png,abc"}}, 422, "not a base64 one"),
        ({"json": {"images": []}}, 422, "no image in the request"),
        ({"json": {}}, 422, "give either 'image'"),
        ({"json": {"image": "x", "conf_threshold": 2}}, 422, "conf_threshold: Input should be less than or equal to 1"),
        ({"params": {"max_det": "0"}, "json": {"image": "x"}}, 422, "max_det: Input should be greater than or equal to 1"),
        ({"params": {"max_det": "5"}, "files": {"file": ("a.png", WHITE)}, "data": {"max_det": "5"}}, 422,
         "given both as a query parameter and in the body"),
        ({"files": {"file": ("a.png", WHITE)}, "data": {"colour": "red"}}, 422, "unknown form field 'colour'"),
        ({"data": {"file": "a.png"}, "files": {"other": ("b.png", WHITE)}}, 422, "is a text field, not a file"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400,
         "multipart form could not be read"),
        ({"content": b'{"image": ', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ],
)
def test_bad_inputs_get_4xx_with_a_message(client, kwargs, status, fragment):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_body_limit_and_missing_multipart_parser(det_dir, client, monkeypatch):
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(noise, "PNG")
    with TestClient(create_app(ServeSettings(export_dir=det_dir, max_body_bytes=20_000), loader=ort_loader)) as c:
        r = c.post("/predict", files={"file": ("noise.png", noise.getvalue())})
        assert r.status_code == 413 and "20000-byte limit" in r.json()["error"]
    monkeypatch.setattr("starlette.requests.parse_options_header", None)  # as without python-multipart
    r = client.post("/predict", files={"file": ("a.png", WHITE)})
    assert r.status_code == 415 and "python-multipart is not installed" in r.json()["error"]


def test_images_to_a_text_model_are_refused(make_client):
    text = make_client()
    for r in (text.post("/predict", files={"file": ("a.png", WHITE)}),
              text.post("/predict", json={"image": base64.b64encode(WHITE).decode()})):
        assert r.status_code == 422
        assert "this model classifies texts and takes no images" in r.json()["error"]


def test_a_setting_the_served_export_never_reads_is_refused_at_load(det_dir, make_client, tmp_path, monkeypatch):
    """A text limit on a detection server (or an image limit on a text one) would be accepted and ignored."""
    from fastapi.testclient import TestClient

    import edgekd
    from edgekd.serving import ServeSettings, create_app
    from edgekd.serving.settings import SettingsError

    with pytest.raises(SettingsError, match=re.escape(
            f"max_length: only a text export reads it, and {det_dir} is a detection export: unset it")):
        edgekd.load(det_dir, max_length=16)
    monkeypatch.setenv("EDGEKD_SERVE_OVERFLOW", "reject")
    with pytest.raises(SettingsError, match=re.escape("max_items, overflow: only a text export reads it")):
        with TestClient(create_app(ServeSettings.from_env(export_dir=det_dir, max_items=8), loader=ort_loader)):
            pass
    monkeypatch.delenv("EDGEKD_SERVE_OVERFLOW")
    with pytest.raises(SettingsError, match=re.escape("max_image_pixels: only a detection export reads it")):
        make_client(max_image_pixels=1000)
    # the same settings where they are read
    make_client(max_items=8, overflow="reject")
    assert edgekd.load(det_dir).task == "detection"


def test_metadata_metrics_and_openapi(client):
    meta = client.get("/metadata").json()
    assert (meta["task"], meta["inputs"], meta["image_size"], meta["labels"]) == ("detection", "images", SIZE, LABELS)
    assert meta["nms_in_graph"] is False and meta["max_length"] is None
    client.post("/predict", files=[("files", ("a.png", WHITE)), ("files", ("b.png", BLACK))])
    metrics = client.get("/metrics").text
    assert "edgekd_images_total" in metrics and "edgekd_detections_total" in metrics
    spec = client.get("/openapi.json").json()
    assert "DetectRequest" in spec["components"]["schemas"]
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def _letterboxed(image: bytes) -> np.ndarray:
    from edgekd.tasks.detection.boxes_np import letterbox

    boxed, _, _ = letterbox(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), SIZE)
    return boxed.transpose(2, 0, 1)[None].astype(np.float32) / 255


def test_v2_metadata_and_raw_infer(client, det_dir):
    meta = client.get("/v2/models/shapes").json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    assert meta["outputs"] == [{"name": "boxes", "datatype": "FP32", "shape": [-1, 3, 4]},
                               {"name": "scores", "datatype": "FP32", "shape": [-1, 3, 2]}]
    x = np.concatenate([_letterboxed(WHITE), _letterboxed(BLACK)])
    r = client.post("/v2/models/shapes/infer", json={"id": "7", "inputs": [
        {"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    want, _ = ort_loader(det_dir)
    ref = want.run({"images": x})
    np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=1e-6)
    np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-6)
    bad = [
        ({"name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}, "must have shape [batch, 3, 64, 64]"),
        ({"name": "images", "shape": [1], "datatype": "INT64", "data": [1]}, "must be a float tensor"),
        ({"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}, "this model detects objects"),
    ]
    for tensor, fragment in bad:
        r = client.post("/v2/models/shapes/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and fragment in r.json()["error"], r.text


def test_v2_binary_images_and_bounded_values(client, det_dir):
    x = _letterboxed(WHITE)
    header = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/shapes/infer", content=header + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    answer, raw = json.loads(r.content[:n]), r.content[n:]
    ref = ort_loader(det_dir)[0].run({"images": x})
    offset = 0
    for out in answer["outputs"]:
        size = out["parameters"]["binary_data_size"]
        got = np.frombuffer(raw[offset:offset + size], dtype="<f4").reshape(out["shape"])
        np.testing.assert_allclose(got, ref[out["name"]], atol=1e-6)
        offset += size
    assert offset == len(raw)
    huge = {"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [10**400] + [0] * (3 * SIZE * SIZE - 1)}
    r = client.post("/v2/models/shapes/infer", json={"inputs": [huge]})
    assert r.status_code == 400 and "too large for FP32" in r.json()["error"]


def test_detection_openapi_and_other_apis_bodies(client):
    predict = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetectRequest")
    assert {p["name"] for p in predict["parameters"]} == {"conf_threshold", "iou_threshold", "max_det"}
    r = client.post("/predict", json={"instances": [{"b64": "..."}]})
    assert r.status_code == 422 and "'instances' is the request field of KServe v1" in r.json()["error"]
    assert '{"images": [...]}' in r.json()["error"]


def test_nms_in_graph_variant_and_load_errors(tmp_path):
    from fastapi.testclient import TestClient

    from edgekd.errors import StageError
    from edgekd.serving import ServeSettings, create_app

    folder = export_tiny_detector(tmp_path / "nms" / "export" / "onnx", nms_in_graph=True)
    with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)) as c:
        r = c.post("/predict", files={"file": ("x.png", WHITE)})
        assert r.status_code == 200, r.text
        # The padded row (score 0) is dropped; no host NMS runs.
        assert [(d["label"], d["box"], d["score"]) for d in r.json()["predictions"][0]["detections"]] == [
            ("circle", BOX0, pytest.approx(0.9))]
        assert c.get("/metadata").json()["nms_in_graph"] is True
        assert [o["name"] for o in c.get("/v2/models/nms").json()["outputs"]] == ["detections"]

    for i, (change, fragment) in enumerate([({"image_size": None}, "no valid image_size"),
                                            ({"task": "segmentation"}, "task 'segmentation'"),
                                            ({"labels": ["one"]}, "lists 1 labels")]):
        bad = export_tiny_detector(tmp_path / f"bad{i}" / "onnx", **change)
        with pytest.raises(StageError, match=fragment):
            with TestClient(create_app(ServeSettings(export_dir=bad), loader=ort_loader)):
                pass


class _SlowRunner:
    """The real runner, slowed so that concurrent requests queue up and batches form."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.calls = inner, delay, []
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, inputs):
        time.sleep(self.delay)
        self.calls.append(len(inputs["images"]))
        return self.inner.run(inputs)


def test_batched_over_http_equals_unbatched(det_dir):
    """Real uvicorn, the default loader (load_artifact), batching on: each image keeps its own result."""
    from edgekd.export.stage import load_artifact
    from edgekd.serving import ServeSettings, create_app

    box: list[_SlowRunner] = []

    def loader(folder, **opts):
        runner, meta = load_artifact(folder, **opts)
        box.append(_SlowRunner(runner, 0.05))
        return box[-1], meta

    settings = ServeSettings(export_dir=det_dir, batching=True, max_batch_size=8, max_wait_ms=20)
    srv = LiveServer(create_app(settings, loader=loader)).start()
    try:
        images = [WHITE, BLACK, WHITE, BLACK, BLACK, WHITE]

        async def post_all():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                return await asyncio.gather(*(c.post("/predict", files={"file": ("x.png", im, "image/png")})
                                              for im in images))

        responses = asyncio.run(post_all())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        got = [len(r.json()["predictions"][0]["detections"]) for r in responses]
        assert got == [2 if im is WHITE else 1 for im in images]
        assert max(box[-1].calls[1:]) > 1, box[-1].calls  # (call 0 is the warm-up)
        r = httpx.post(f"{srv.url}/predict", json={"images": [base64.b64encode(im).decode() for im in images[:2]]})
        assert [len(p["detections"]) for p in r.json()["predictions"]] == [2, 1]
    finally:
        srv.stop()


def test_detection_serving_imports_no_torch(det_dir):
    code = textwrap.dedent("""
        import json, sys
        from fastapi.testclient import TestClient
        from edgekd.serving import ServeSettings, create_app
        with TestClient(create_app(ServeSettings(export_dir=sys.argv[1]))) as c:
            r = c.post("/predict", files={"file": ("x.png", open(sys.argv[2], "rb").read())})
        print(json.dumps({"status": r.status_code, "torch": "torch" in sys.modules}))
    """)
    image = det_dir.parent / "white.png"
    image.write_bytes(WHITE)
    proc = subprocess.run([sys.executable, "-c", code, str(det_dir), str(image)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 200, "torch": False}


def test_the_python_api_detects_as_the_route_does(det_dir, client, tmp_path):
    """edgekd.load(folder).predict takes bytes, PIL images, RGB arrays and paths, and gives the
    boxes POST /predict gives for the same image; options and bad input as the server takes them."""
    import edgekd
    from edgekd.errors import DataError

    model = edgekd.load(det_dir)
    assert model.task == "detection" and model.labels == LABELS
    path = tmp_path / "white.png"
    path.write_bytes(WHITE)
    array = np.asarray(Image.open(io.BytesIO(WHITE)).convert("RGB"))
    got = model.predict([WHITE, Image.open(io.BytesIO(BLACK)), array, path])
    white = client.post("/predict", files={"file": ("w.png", WHITE, "image/png")}).json()["predictions"][0]
    black = client.post("/predict", files={"file": ("b.png", BLACK, "image/png")}).json()["predictions"][0]
    for dets, want in zip(got, [white, black, white, white], strict=True):
        assert [(d.label, list(d.box)) for d in dets] == _boxes(want)
        assert [d.score for d in dets] == pytest.approx([d["score"] for d in want["detections"]], abs=1e-6)
    assert len(model.predict(WHITE)) == 1  # one image in, one list of detections out
    assert [d.label for d in model.predict(WHITE, conf_threshold=0.95)[0]] == []  # 0.9 and 0.66 < 0.95
    with pytest.raises(DataError, match="no images"):
        model.predict([])
    with pytest.raises(DataError, match="does not exist"):
        model.predict(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"H x W x 3 RGB uint8"):
        model.predict(np.zeros((4, 4, 3), np.float32))


def test_options_a_request_leaves_out_are_the_exports_recorded_postprocess(tmp_path, client):
    """artifact.json's postprocess (the recipe's detection.conf_threshold, iou_threshold, max_det) is what a
    request without options gets, from POST /predict and from edgekd.load(...).predict; a request's own value
    wins. (An export that records none keeps 0.25 / 0.6 / 100: the module's ``client``.)"""
    from fastapi.testclient import TestClient

    import edgekd
    from edgekd.serving import ServeSettings, create_app

    recorded = {"conf_threshold": 0.85, "iou_threshold": 0.9, "max_det": 2}
    folder = export_tiny_detector(tmp_path / "pp" / "export" / "onnx", postprocess=recorded)
    legacy = lambda query: client.post(f"/predict?{query}", files={"file": ("x.png", WHITE)}).json()  # noqa: E731
    with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)) as c:
        post = lambda query="": c.post(f"/predict?{query}", files={"file": ("x.png", WHITE)}).json()  # noqa: E731
        # As with conf_threshold=0.85 (only anchor 0's 0.9 passes), not the 0.25 of an export without postprocess.
        assert post()["predictions"] == legacy("conf_threshold=0.85&iou_threshold=0.9&max_det=2")["predictions"]
        assert _boxes(post()["predictions"][0]) == [("square", BOX0)]
        # A request's own threshold wins; the recorded IoU 0.9 keeps anchor 1 and max_det 2 cuts anchor 2.
        assert [d["score"] for d in post("conf_threshold=0.25")["predictions"][0]["detections"]] == pytest.approx(
            [0.9, 0.8])
        assert post("conf_threshold=0.25&iou_threshold=0.6&max_det=100")["predictions"] == legacy("")["predictions"]
        r = c.post("/predict", json={"image": base64.b64encode(WHITE).decode(), "max_det": 3, "conf_threshold": 0.5})
        assert len(r.json()["predictions"][0]["detections"]) == 3
        assert c.get("/metadata").json()["artifact"]["postprocess"] == recorded
    model = edgekd.load(folder)
    [dets] = model.predict(WHITE)
    assert [(d.label, list(d.box)) for d in dets] == [("square", BOX0)]
    assert [d.score for d in model.predict(WHITE, conf_threshold=0.25)[0]] == pytest.approx([0.9, 0.8])
    assert [d.score for d in model.predict(WHITE, conf_threshold=None)[0]] == pytest.approx([0.9])
    assert len(model.predict(WHITE, conf_threshold=0.25, max_det=10)[0]) == 3


@pytest.mark.parametrize(("recorded", "fragment"), [
    ({"conf_threshold": 1.5}, "conf_threshold: Input should be less than or equal to 1"),
    ({"conf_threshold": 0.3, "nms": True}, "nms: Extra inputs are not permitted"),
    ([0.25, 0.6, 100], "postprocess: Input should be a valid dictionary"),
])
def test_a_recorded_postprocess_no_request_could_give_is_refused_at_load(tmp_path, recorded, fragment):
    from fastapi.testclient import TestClient

    from edgekd.errors import StageError
    from edgekd.serving import ServeSettings, create_app

    folder = export_tiny_detector(tmp_path / "bad" / "export" / "onnx", postprocess=recorded)
    with pytest.raises(StageError, match=re.escape(fragment)):
        with TestClient(create_app(ServeSettings(export_dir=folder), loader=ort_loader)):
            pass


def test_the_python_api_gives_each_images_width_and_height_and_names_a_bad_option(det_dir, client):
    """POST /predict answers each image's width and height beside its detections; edgekd.load(...).predict
    gave the detections alone. An invalid option was pydantic's error about DetectOptions."""
    import edgekd
    from edgekd.errors import ArgumentError

    model = edgekd.load(det_dir)
    small = png(64, 48)
    got = model.predict([WHITE, small])
    served = client.post("/predict", files=[("files", ("a.png", WHITE, "image/png")),
                                            ("files", ("b.png", small, "image/png"))]).json()["predictions"]
    assert [(r.width, r.height) for r in got] == [(p["width"], p["height"]) for p in served] == [(200, 100), (64, 48)]
    assert [[(d.label, list(d.box)) for d in r.detections] for r in got] == [_boxes(p) for p in served]
    assert [(d.label, list(d.box)) for d in got[0]] == _boxes(served[0])  # still the list of its detections
    for option, value, message in [("conf_threshold", 2.0, "less than or equal to 1"),
                                   ("max_det", 0, "greater than or equal to 1")]:
        with pytest.raises(ArgumentError, match=rf"{option}: Input should be {message} \(got {value!r}\)") as e:
            model.predict(WHITE, **{option: value})
        assert "DetectOptions" not in str(e.value) and "validation error" not in str(e.value)
