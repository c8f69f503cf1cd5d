"""Loading detection data: COCO json + PNGs made here, YOLO variants, batching, and error messages.

(Named test_detection_data.py: tests/test_data.py already holds the module name test_data.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekd.errors import DataError
from edgekd.tasks.detection.data import DetectionSplit, load_coco, load_detection_split, load_yolo


def write_png(path: Path, w: int, h: int, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    write_png(tmp_path / "images" / "a.png", 200, 100, 10)
    write_png(tmp_path / "images" / "sub" / "b.png", 64, 64, 20)
    coco = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 3, "file_name": "sub/b.png", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [20, 10, 40, 30], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 200, 100], "iscrowd": 1},  # crowd: kept apart, not a box
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [100, 50, 10, 10]},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [1, 1, 0, 5]},  # empty box: left out
        ],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 5, "name": "cat"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path


def test_load_coco(coco_dir):
    split = load_detection_split(coco_dir / "instances.json", "ignored", 128)
    assert split.names == ["cat", "zebra"]  # categories in sorted id order: 5 -> 0, 90 -> 1
    assert split.files == ["a.png", "sub/b.png"] and len(split) == 2
    assert split.images.shape == (2, 128, 128, 3) and split.images.dtype == np.uint8
    # 200x100 -> scale 0.64, content 128x64 centred: pad_y = 32
    np.testing.assert_allclose(split.boxes[0], [[12.8, 38.4, 38.4, 57.6], [64.0, 64.0, 70.4, 70.4]], atol=1e-4)
    assert split.classes[0].tolist() == [1, 0]
    assert split.images[0, 0, 0].tolist() == [114] * 3 and split.images[0, 64, 64].tolist() == [10] * 3
    assert split.boxes[1].shape == (0, 4) and split.classes[1].dtype == np.int64
    assert load_coco(coco_dir / "instances.json", coco_dir / "images", 64).boxes[0].shape == (2, 4)


def test_coco_images_beside_the_json(tmp_path):
    write_png(tmp_path / "pics" / "x.png", 32, 32)
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "pics/x.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 16]}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    split = load_detection_split(tmp_path / "ann.json", "val", 64)
    np.testing.assert_allclose(split.boxes[0], [[0, 0, 32, 32]])


def test_coco_errors(coco_dir, tmp_path):
    with pytest.raises(DataError, match=r"nope\.json does not exist"):
        load_detection_split(coco_dir / "nope.json", "val", 64)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="lacks the COCO key.*annotations, categories"):
        load_coco(tmp_path / "bad.json", None, 64)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="Cannot read .* as JSON"):
        load_coco(tmp_path / "broken.json", None, 64)
    (coco_dir / "images" / "sub" / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) of .* are missing \(first: .*b\.png\)"):
        load_coco(coco_dir / "instances.json", None, 64)
    write_png(coco_dir / "images" / "sub" / "b.png", 60, 64)
    with pytest.raises(DataError, match="is 60x64 but its annotations say 64x64"):
        load_coco(coco_dir / "instances.json", None, 64)
    with pytest.raises(DataError, match="neither a YOLO data.yaml"):
        load_detection_split(coco_dir / "images" / "a.png", "val", 64)


def make_yolo(root: Path, names_yaml: str = "names: [a, b]") -> Path:
    write_png(root / "images" / "train" / "0.png", 100, 50)
    write_png(root / "images" / "train" / "1.png", 40, 40)  # no label file: no boxes
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "0.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.3 0.3 0.2 0.2\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: val.txt\n{names_yaml}\n")
    (root / "val.txt").write_text("./images/train/0.png\n")
    return root / "data.yaml"


def test_load_yolo_folder_list_file_polygons_and_missing_labels(tmp_path):
    data_yaml = make_yolo(tmp_path)
    split = load_yolo(data_yaml, "train", 100)
    assert split.names == ["a", "b"] and len(split) == 2
    # 100x50 image at 100 px: scale 1, pad_y 25; the polygon row becomes its bounding box
    np.testing.assert_allclose(split.boxes[0], [[40, 40, 60, 60], [10, 30, 30, 40]], atol=1e-4)
    assert split.classes[0].tolist() == [1, 0] and split.boxes[1].shape == (0, 4)
    assert len(load_detection_split(tmp_path, "val", 64)) == 1  # a folder holding data.yaml, a list file
    assert load_yolo(make_yolo(tmp_path / "d", "names: {0: a, 1: b}"), "train", 64).names == ["a", "b"]


def test_yolo_errors(tmp_path):
    data_yaml = make_yolo(tmp_path)
    with pytest.raises(DataError, match="has no 'test' entry \\(it has: train, val\\)"):
        load_yolo(data_yaml, "test", 64)
    (tmp_path / "labels" / "train" / "0.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"0\.txt:1: class 5 is not one of the ids 0\.\.1"):
        load_yolo(data_yaml, "train", 64)
    (tmp_path / "labels" / "train" / "0.txt").write_text("0 50 25 20 20\n")
    with pytest.raises(DataError, match="above 1; YOLO labels are normalised"):
        load_yolo(data_yaml, "train", 64)
    (tmp_path / "labels" / "train" / "0.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match="expected 'cls cx cy w h'"):
        load_yolo(data_yaml, "train", 64)
    (tmp_path / "data.yaml").write_text("train: nowhere\nnames: [a]\n")
    with pytest.raises(DataError, match="points at .*nowhere, which is not a folder of images"):
        load_yolo(data_yaml, "train", 64)
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DataError, match="has no class names"):
        load_yolo(data_yaml, "train", 64)
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: {0: a, 2: b}\n")
    with pytest.raises(DataError, match="must map the ids 0..1"):
        load_yolo(data_yaml, "train", 64)
    with pytest.raises(DataError, match="does not exist: expected an Ultralytics data.yaml"):
        load_yolo(tmp_path / "missing.yaml", "train", 64)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"not a png")
    (tmp_path / "data.yaml").write_text("train: corrupt\nnames: [a]\n")
    with pytest.raises(DataError, match=r"Cannot decode image .*x\.png"):
        load_yolo(data_yaml, "train", 64)


def small_split() -> DetectionSplit:
    images = np.arange(5 * 8 * 8 * 3, dtype=np.uint8).reshape(5, 8, 8, 3)
    boxes = [np.array([[1, 2, 3, 4]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[0, 0, 8, 8], [2, 2, 4, 6]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[5, 1, 7, 2]], np.float32)]
    classes = [np.array([1]), np.zeros(0, np.int64), np.array([0, 2]), np.zeros(0, np.int64), np.array([2])]
    return DetectionSplit(images, boxes, [c.astype(np.int64) for c in classes], ["x", "y", "z"],
                          [f"{i}.png" for i in range(5)], 8)


def test_batches_collate_and_ground_truth():
    split = small_split()
    batches = split.train_batches(2, seed=0)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(5))
    assert [b.tolist() for b in split.train_batches(2, seed=0)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in split.eval_batches(2)] == [[0, 1], [2, 3], [4]]
    out = split.collate([1, 2])
    assert out["images"].shape == (2, 3, 8, 8) and out["images"].dtype == np.float32
    np.testing.assert_allclose(out["images"][0], split.images[1].transpose(2, 0, 1) / 255)
    assert out["gt_boxes"].shape == (2, 2, 4) and out["gt_mask"].tolist() == [[0, 0], [1, 1]]
    assert out["gt_classes"].tolist() == [[0, 0], [0, 2]] and out["gt_classes"].dtype == np.int64
    empty = split.collate([1, 3])  # no boxes at all: still one (masked) slot
    assert empty["gt_boxes"].shape == (2, 1, 4) and empty["gt_mask"].sum() == 0
    labels = split.ground_truth()
    assert labels.dtype == object and labels.shape == (5,)
    assert np.asarray(labels)[:2].shape == (2,)
    np.testing.assert_allclose(labels[2], [[0, 0, 0, 8, 8], [2, 2, 2, 4, 6]])
    assert labels[1].shape == (0, 5) and labels[1].dtype == np.float32
    assert split.ground_truth([4])[0].tolist() == [[2, 5, 1, 7, 2]]
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        split.eval_batches(0)


def test_collate_flip_mirrors_images_and_boxes():
    split = small_split()
    idx = np.arange(5)
    flipped = next(s for s in range(100) if (np.random.default_rng(s).random(5) < 0.5)[[0, 2]].all())
    out = split.collate(idx, flip_seed=flipped)
    np.testing.assert_allclose(out["images"][0], split.images[0][:, ::-1].transpose(2, 0, 1) / 255)
    np.testing.assert_allclose(out["gt_boxes"][0, 0], [5, 2, 7, 4])
    np.testing.assert_allclose(out["gt_boxes"][2, :2], [[0, 0, 8, 8], [4, 2, 6, 6]])
    assert np.array_equal(split.collate(idx, flip_seed=flipped)["images"], out["images"])  # seeded
    np.testing.assert_allclose(split.images[0, 0, 0], [0, 1, 2])  # the stored images are untouched
