"""Images as every detection path reads them (``edgekd.tasks.detection.images``): the training loader,
the serving decoder and ``predict`` see the same pixels for a phone photo with an EXIF orientation and
for a 16-bit greyscale image; a COCO set's category ids go from the data to the saved model, the export
and the predictions; and the serving side's modules import on their own."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgekd.tasks.detection.boxes_np import letterbox
from edgekd.tasks.detection.data import load_coco, load_yolo
from edgekd.tasks.detection.images import ORIENTATION_TAG, orient_boxes

S = 40  # model input: a stored 40x20 photo shown 20x40 fills the height, padded 10 px left and right


# --- importing the serving side alone -------------------------------------------------------------
@pytest.mark.parametrize("module", ["edgekd.tasks.detection.codec", "edgekd.tasks.detection.serve",
                                    "edgekd.tasks.text.codec", "edgekd.tasks.text.serve"])
def test_a_family_serving_module_imports_alone_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}; import edgekd.serving.app"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --- EXIF orientation -----------------------------------------------------------------------------
def phone_photo(orientation: int = 6) -> bytes:
    """A JPEG stored 40x20 (its left 10 columns white, the rest dark) that a viewer turns upright by
    its EXIF orientation: 6 shows it 20x40, the white part on top."""
    pixels = np.full((20, 40, 3), 30, np.uint8)
    pixels[:, :10] = 250
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _codec():
    from edgekd.tasks.detection.codec import DetectionCodec

    return DetectionCodec(image_size=S, labels=["a", "b"], input_name="images", output_names=["boxes", "scores"],
                          max_image_pixels=10**6)


class SeenEngine:
    """What ``predict_local`` needs of an InferenceEngine: one box over the whole input, class 0."""

    def __init__(self):
        self.items = []

    def run_items(self, items):
        self.items += items
        n = len(items)
        return {"boxes": np.tile(np.float32([[[0, 0, S, S]]]), (n, 1, 1)),
                "scores": np.tile(np.float32([[[0.9, 0.1]]]), (n, 1, 1))}


def test_predict_turns_a_pil_image_upright_as_it_does_its_file_and_bytes(tmp_path):
    from edgekd.tasks.detection.codec import PAD_VALUE
    from edgekd.tasks.detection.serve import predict_local

    data = phone_photo()
    (tmp_path / "photo.jpg").write_bytes(data)
    opened = Image.open(io.BytesIO(data))
    given = [opened, data, tmp_path / "photo.jpg", ImageOps.exif_transpose(Image.open(io.BytesIO(data)))]
    engine = SeenEngine()
    found = predict_local(_codec(), engine, given, 8, {})
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert want.shape == (40, 20, 3) and want[:10].mean() > 200 and want[20:].mean() < 60  # white on top
    for what, item, dets in zip(["PIL image", "bytes", "file", "PIL image made upright"], engine.items, found,
                                strict=True):
        assert (item.width, item.height) == (20, 40), what
        np.testing.assert_array_equal(item.pixels, letterbox(want, S, fill=PAD_VALUE)[0], err_msg=what)
        assert [d.box for d in dets] == [(0.0, 0.0, 20.0, 40.0)], what


def _coco(root: Path, image: dict, bbox: list[float]) -> Path:
    (root / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "photo.jpg", **image}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox}],
        "categories": [{"id": 1, "name": "white"}],
    }))
    return root / "ann.json"


@pytest.mark.parametrize(("image", "bbox"), [
    ({}, [0, 0, 20, 10]),  # no size: boxes on the upright image, as detectron2 and Ultralytics read them
    ({"width": 20, "height": 40}, [0, 0, 20, 10]),  # annotated on the upright image
    ({"width": 40, "height": 20}, [0, 0, 10, 20]),  # annotated on the stored pixels (a tool ignoring EXIF)
], ids=["coco-no-size", "coco-upright", "coco-stored"])
def test_a_dataset_photo_with_exif_orientation_trains_on_the_pixels_it_is_served_with(tmp_path, image, bbox):
    data = phone_photo()
    (tmp_path / "photo.jpg").write_bytes(data)
    served = _codec().encode([("photo", data, "image/jpeg")])[0].pixels
    split = load_coco(_coco(tmp_path, image, bbox), tmp_path, S)
    np.testing.assert_array_equal(split.images[0], served)
    np.testing.assert_allclose(split.boxes[0], [[10, 0, 30, 10]])  # the white top of the upright photo
    # YOLO (Ultralytics' convention: labels normalised on the upright image) reads it the same way
    (tmp_path / "yolo" / "images").mkdir(parents=True)
    (tmp_path / "yolo" / "labels").mkdir()
    (tmp_path / "yolo" / "images" / "photo.jpg").write_bytes(data)
    (tmp_path / "yolo" / "labels" / "photo.txt").write_text("0 0.5 0.125 1 0.25\n")
    (tmp_path / "yolo" / "data.yaml").write_text("train: images\nnames: [white]\n")
    yolo = load_yolo(tmp_path / "yolo" / "data.yaml", "train", S)
    np.testing.assert_array_equal(yolo.images[0], served)
    np.testing.assert_allclose(yolo.boxes[0], [[10, 0, 30, 10]])


@pytest.mark.parametrize("turn", range(1, 9))
def test_orient_boxes_moves_a_box_where_exif_transpose_moves_its_pixels(turn):
    stored = np.zeros((4, 7), np.uint8)  # 7 wide, 4 high
    stored[0:2, 1:4] = 255  # box x 1..4, y 0..2
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = turn
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    ys, xs = np.nonzero(shown)
    assert orient_boxes(np.array([[1, 0, 4, 2]]), turn, 7, 4).tolist() == [[xs.min(), ys.min(), xs.max() + 1,
                                                                             ys.max() + 1]]


# --- 16-bit greyscale -----------------------------------------------------------------------------
def test_a_16_bit_greyscale_image_is_the_same_pixels_in_training_and_serving(tmp_path):
    from edgekd.tasks.detection.codec import decode_image
    from edgekd.tasks.detection.serve import predict_local

    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    (tmp_path / "images").mkdir()
    Image.fromarray(ramp).save(tmp_path / "images" / "depth.png")
    data = (tmp_path / "images" / "depth.png").read_bytes()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    (tmp_path / "data.yaml").write_text("train: images\nnames: [thing]\n")
    trained = load_yolo(tmp_path / "data.yaml", "train", S).images[0]
    served = _codec().encode([("depth", data, "image/png")])[0].pixels
    np.testing.assert_array_equal(trained, served)
    want = np.round(ramp / 65535.0 * 255).astype(np.uint8)  # rescaled to 8 bits, not clipped at 255
    np.testing.assert_array_equal(decode_image(data, "depth", 10**6), np.repeat(want[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(trained[..., 0], want)
    engine = SeenEngine()  # and predict given the PIL image
    predict_local(_codec(), engine, Image.open(io.BytesIO(data)), 8, {})
    np.testing.assert_array_equal(engine.items[0].pixels, served)


# --- COCO category ids ----------------------------------------------------------------------------
def coco_set(root: Path, n: int = 6) -> Path:
    """A COCO set whose categories are ids 7 (car) and 3 (dog), as COCO's own have gaps (1..90)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 48, "height": 32})
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "bbox": [2, 2, 20, 20]})
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 3, "bbox": [24, 8, 20, 20]})
    (root / "instances.json").write_text(json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "dog"}],
    }))
    return root / "instances.json"


def test_a_coco_set_names_its_category_ids_and_a_yolo_set_none(tmp_path):
    split = load_coco(coco_set(tmp_path), None, 32)
    assert split.names == ["dog", "car"] and split.category_ids == [3, 7]  # class 0 is category 3
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(yolo / "images" / "a.png")
    (yolo / "data.yaml").write_text("train: images\nnames: [dog, car]\n")
    assert load_yolo(yolo / "data.yaml", "train", 32).category_ids is None


def _export(task, folder: Path) -> Path:
    """An export folder with ``task``'s artifact.json fields, as the export stage writes them, around an
    ONNX graph (built here, no torch export) that finds one box of class 0 and one of class 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.export.base import write_artifact_meta
    from edgekd.runfolder import sha256_file

    s = task.image_size
    boxes = np.float32([[[2, 2, 12, 12], [18, 18, 30, 30]]])
    scores = np.float32([[[0.9, 0.05], [0.1, 0.8]]])
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["mean", "axes"], ["m"]),
             helper.make_node("Mul", ["m", "zero"], ["z"]),  # [B,1,1] zeros: the outputs keep the batch
             helper.make_node("Add", ["z", "box_const"], ["boxes"]),
             helper.make_node("Add", ["z", "score_const"], ["scores"])]
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(boxes, "box_const"), numpy_helper.from_array(scores, "score_const")]
    graph = helper.make_graph(nodes, "two_boxes", [helper.make_tensor_value_info(
        "images", TensorProto.FLOAT, ["batch", 3, s, s])], [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 2, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, 2])], inits)
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    io_ = task.model_io()
    write_artifact_meta(folder, {
        "target": "onnx", "exporter": "onnx", "file": path.name, "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size, "precision": "fp32", "files": {path.name: sha256_file(path)},
        "io": {"input_names": io_.input_names, "output_names": io_.output_names,
               "dynamic_axes": {n: {"0": "batch"} for n in [*io_.input_names, *io_.output_names]},
               "dtypes": {"images": "float32"}},
        "task": task.name, "labels": task.label_names, **task.export_meta(),  # as edgekd.stages.export does
    })
    return folder


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A COCO recipe's context, a detector saved by its task, and an export with its task's fields."""
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe, parse_recipe
    from edgekd.tasks.detection.models import build_detector
    from edgekd.testing import tiny_detector_config

    root = tmp_path_factory.mktemp("coco")
    data = load_recipe("detect-default").model_dump(mode="json")
    data.update(name="coco-ids", output_dir=str(root / "runs"))
    data["data"]["dataset"] = str(coco_set(root))
    data["detection"]["image_size"] = 32
    ctx = create_context(parse_recipe(data))
    ctx.task.save_model(build_detector(tiny_detector_config(), 2, 32), root / "model")
    return ctx, root / "model", _export(ctx.task, root / "export")


@pytest.fixture(scope="module")
def yolo_export(tmp_path_factory):
    """An export of a task whose data named no category ids (YOLO)."""
    from edgekd.tasks.detection.task import DetectionTask

    return _export(DetectionTask(["dog", "car"], 32), tmp_path_factory.mktemp("yolo") / "export")


def test_coco_category_ids_go_from_the_data_to_the_saved_model_the_export_and_predict(coco_run):
    import edgekd
    from edgekd.tasks.detection.models import saved_category_ids

    ctx, model_dir, export_dir = coco_run
    assert ctx.task.label_names == ["dog", "car"] and ctx.task.category_ids == [3, 7]
    assert saved_category_ids(model_dir) == [3, 7]
    assert ctx.export_settings["category_ids"] == [3, 7]  # a renumbered category is exported again
    meta = json.loads((export_dir / "artifact.json").read_text())
    assert meta["labels"] == ["dog", "car"] and meta["category_ids"] == [3, 7]
    found = edgekd.load(export_dir).predict(np.full((32, 48, 3), 90, np.uint8))[0]
    assert [(d.class_id, d.label, d.category_id) for d in found] == [(0, "dog", 3), (1, "car", 7)]


def test_data_without_category_ids_gives_predictions_without_one(tmp_path, yolo_export):
    import edgekd
    from edgekd.tasks.detection.models import build_detector, saved_category_ids
    from edgekd.tasks.detection.task import DetectionTask
    from edgekd.testing import tiny_detector_config

    DetectionTask(["dog", "car"], 32).save_model(build_detector(tiny_detector_config(), 2, 32), tmp_path / "model")
    assert saved_category_ids(tmp_path / "model") is None
    assert "category_ids" not in json.loads((yolo_export / "artifact.json").read_text())
    found = edgekd.load(yolo_export).predict(np.zeros((32, 32, 3), np.uint8))[0]
    assert [d.class_id for d in found] == [0, 1] and all(d.category_id is None for d in found)


def _served(export_dir: Path):
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    return TestClient(create_app(ServeSettings(export_dir=export_dir)))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_server_says_the_category_id_of_each_class(coco_run):
    with _served(coco_run[2]) as client:
        assert client.get("/metadata").json()["category_ids"] == [3, 7]


def test_post_predict_answers_the_category_id_beside_the_class_index(coco_run):
    with _served(coco_run[2]) as client:
        r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 200, r.text
        dets = r.json()["predictions"][0]["detections"]
        assert [(d["class_id"], d["category_id"]) for d in dets] == [(0, 3), (1, 7)]


def test_the_server_leaves_out_category_ids_it_does_not_know(yolo_export):
    with _served(yolo_export) as client:
        assert "category_ids" not in client.get("/metadata").json()
        r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
        dets = r.json()["predictions"][0]["detections"]
        assert [d["class_id"] for d in dets] == [0, 1] and all("category_id" not in d for d in dets)
