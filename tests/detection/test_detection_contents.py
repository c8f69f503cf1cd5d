"""The data a detection run reads, as it reaches the stages: the data fingerprint follows the contents of
a YOLO or COCO set (not only its counts), and COCO crowd regions are scored as pycocotools scores them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekd.pipeline import create_context
from edgekd.recipe import load_recipe, parse_recipe
from edgekd.tasks.detection.data import load_coco


def _png(path: Path, w: int, h: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _recipe(tmp_path: Path, dataset: Path):
    data = load_recipe("detect-default").model_dump(mode="json")
    data.update(name="tiny-det", output_dir=str(tmp_path / "runs"))
    data["data"]["dataset"] = str(dataset)
    data["detection"].update(image_size=32)
    return parse_recipe(data)


def _fingerprint(tmp_path: Path, dataset: Path) -> str:
    return create_context(_recipe(tmp_path, dataset)).data_fingerprint


def _yolo(root: Path) -> Path:
    for split in ("train", "val"):
        for i in range(2):
            _png(root / "images" / split / f"{i}.png", 40, 40, 10 * i + 5)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    return root / "data.yaml"


def test_the_data_fingerprint_of_a_yolo_set_follows_its_labels_and_images(tmp_path):
    data_yaml = _yolo(tmp_path / "set")
    base = _fingerprint(tmp_path, data_yaml)
    assert _fingerprint(tmp_path, data_yaml) == base  # loading again changes nothing
    label = tmp_path / "set" / "labels" / "train" / "0.txt"
    label.write_text("1 0.5 0.5 0.2 0.2\n")  # a class id fixed: same counts
    fixed_class = _fingerprint(tmp_path, data_yaml)
    assert fixed_class != base
    label.write_text("1 0.4 0.5 0.2 0.2\n")  # a box moved
    moved = _fingerprint(tmp_path, data_yaml)
    assert moved not in (base, fixed_class)
    _png(tmp_path / "set" / "images" / "val" / "1.png", 40, 40, 200)  # an image replaced
    assert _fingerprint(tmp_path, data_yaml) not in (base, fixed_class, moved)


def _coco(root: Path, order: list[int], crowd: bool = False) -> Path:
    images = []
    for i in range(6):
        _png(root / f"{i}.png", 40, 40, 20 * i)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 40, "height": 40})
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 0}
                   for i in range(6)]
    if crowd:
        annotations.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 1})
    coco = {"images": [images[i] for i in order], "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root / "instances.json"


def test_the_data_fingerprint_of_a_coco_set_follows_the_order_of_its_images(tmp_path):
    """The seeded split cuts the json's image list by position: reordered, other images land in test."""
    (tmp_path / "coco").mkdir()
    path = _coco(tmp_path / "coco", [0, 1, 2, 3, 4, 5])
    base = _fingerprint(tmp_path, path)
    _coco(tmp_path / "coco", [5, 4, 3, 2, 1, 0])
    assert _fingerprint(tmp_path, path) != base
    _coco(tmp_path / "coco", [0, 1, 2, 3, 4, 5], crowd=True)  # a crowd region added
    assert _fingerprint(tmp_path, path) != base


def test_crowd_regions_are_kept_apart_from_the_training_boxes_and_scored_as_crowd(tmp_path):
    """One image with a box and a crowd region, perfect detections on both: pycocotools on the original
    json scores 1.0 (a detection on a crowd region is ignored); a crowd region scored as an ordinary box,
    or a detection on it scored as a false positive, gives less."""
    pytest.importorskip("pycocotools")
    from edgekd.tasks.detection.metrics import coco_map

    _png(tmp_path / "a.png", 64, 64, 50)
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 30, 30], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }))
    split = load_coco(tmp_path / "ann.json", None, 64)
    assert split.boxes[0].tolist() == [[4, 4, 20, 20]] and split.classes[0].tolist() == [0]  # trained on
    assert split.collate([0])["gt_mask"].sum() == 1  # the crowd region is no training target
    gt = split.ground_truth()
    np.testing.assert_allclose(gt[0], [[0, 4, 4, 20, 20, 0], [0, 30, 30, 60, 60, 1]])
    # the crowd detection ranked first: a false positive would halve AP (0.5)
    dets = [np.array([[30, 30, 60, 60, 0.95, 0], [4, 4, 20, 20, 0.9, 0]], np.float32)]
    assert coco_map(dets, list(gt), num_classes=1)["map50"] == pytest.approx(1.0)
    # the crowd region is no target either: detecting the box alone scores 1.0 too
    assert coco_map([dets[0][1:]], list(gt), num_classes=1)["map50"] == pytest.approx(1.0)
    # an image without crowd regions keeps its 5 columns
    assert split.ground_truth()[0].shape == (2, 6) and gt[0][:1, :5].tolist() == [[0, 4, 4, 20, 20]]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16]}],
        "categories": [{"id": 1, "name": "person"}],
    }))
    assert load_coco(tmp_path / "ann.json", None, 64).ground_truth()[0].shape == (1, 5)


def test_a_saved_detector_records_its_class_names_and_is_refused_on_other_classes(tmp_path):
    """A detector trained on [cat, dog] read on a [dog, cat] set would score every box as the other class."""
    import json as _json

    from edgekd.errors import StageError
    from edgekd.tasks.detection.models import CONFIG_FILE, build_detector, save_detector, saved_class_names
    from edgekd.tasks.detection.task import DetectionTask
    from edgekd.testing import tiny_detector_config

    cats_dogs = DetectionTask(["cat", "dog"], 32)
    cats_dogs.save_model(build_detector(tiny_detector_config(), 2, 32), tmp_path / "det")
    assert saved_class_names(tmp_path / "det") == ["cat", "dog"]
    assert cats_dogs.load_model(tmp_path / "det").num_classes == 2
    with pytest.raises(StageError, match=r"trained on the classes \[cat, dog\], the dataset has \[dog, cat\]"):
        DetectionTask(["dog", "cat"], 32).load_model(tmp_path / "det")
    # a folder saved before names were recorded: judged by its class count, as before
    meta = _json.loads((tmp_path / "det" / CONFIG_FILE).read_text())
    del meta["names"]
    (tmp_path / "det" / CONFIG_FILE).write_text(_json.dumps(meta))
    assert saved_class_names(tmp_path / "det") is None
    assert DetectionTask(["dog", "cat"], 32).load_model(tmp_path / "det").num_classes == 2
    with pytest.raises(StageError, match="detects 2 classes, the dataset has 3"):
        DetectionTask(["a", "b", "c"], 32).load_model(tmp_path / "det")
    save_detector(build_detector(tiny_detector_config(), 2, 32), tmp_path / "plain")  # names optional
    assert saved_class_names(tmp_path / "plain") is None
