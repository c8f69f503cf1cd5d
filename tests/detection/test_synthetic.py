"""The synthetic shapes set: deterministic bytes, sane labels, reuse, and a YOLO layout that loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edgekd.errors import DataError
from edgekd.tasks.detection import synthetic
from edgekd.tasks.detection.data import load_yolo
from edgekd.tasks.detection.synthetic import CLASS_NAMES, generate

SMALL = {"n_train": 8, "n_val": 3, "n_test": 2, "image_size": 64, "max_objects": 6}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", seed=3, **SMALL).parent
    b = generate(tmp_path / "b", seed=3, **SMALL).parent
    c = generate(tmp_path / "c", seed=4, **SMALL).parent
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta.keys() == tb.keys() == tc.keys()
    # data.yaml names its own absolute folder; everything else is byte-identical
    assert {k: v for k, v in ta.items() if k != "data.yaml"} == {k: v for k, v in tb.items() if k != "data.yaml"}
    assert ta["data.yaml"].replace(str(a.resolve()).encode(), b"") == tb["data.yaml"].replace(
        str(b.resolve()).encode(), b""
    )
    assert ta["images/train/000000.png"] != tc["images/train/000000.png"]
    assert sum(ta[k] != tc[k] for k in ta if k.startswith("labels/")) > 0
    # regenerating in the same place reproduces every byte, data.yaml included
    for p in sorted(a.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    a.rmdir()
    assert tree_bytes(generate(tmp_path / "a", seed=3, **SMALL).parent) == ta


def test_layout_and_labels_are_valid(tmp_path):
    data_yaml = generate(tmp_path / "ds", seed=0, **SMALL)
    root = data_yaml.parent
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec["path"] == str(root.resolve())
    assert (spec["train"], spec["val"], spec["test"]) == ("images/train", "images/val", "images/test")
    assert spec["names"] == dict(enumerate(CLASS_NAMES))
    for split, n in (("train", 8), ("val", 3), ("test", 2)):
        images = sorted((root / "images" / split).iterdir())
        assert [p.name for p in images] == [f"{i:06d}.png" for i in range(n)]
        for img in images:
            with Image.open(img) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
            rows = np.loadtxt(root / "labels" / split / f"{img.stem}.txt", ndmin=2)
            assert 1 <= len(rows) <= 6
            assert set(rows[:, 0]) <= set(range(len(CLASS_NAMES)))
            cx, cy, w, h = rows[:, 1:].T
            assert np.all(w > 0) and np.all(h > 0)
            assert np.all(cx - w / 2 >= -1e-6) and np.all(cx + w / 2 <= 1 + 1e-6)
            assert np.all(cy - h / 2 >= -1e-6) and np.all(cy + h / 2 <= 1 + 1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temporary folder left behind


def test_no_label_for_a_hidden_object_and_boxes_are_the_visible_parts():
    """Crowded images: every object keeps at least half its pixels, and its box bounds what shows."""
    for i in range(40):
        _, owner, classes, areas = synthetic._draw(np.random.default_rng([9, i]), 64, 12)
        visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]
        assert np.all(visible >= 0.5 * np.asarray(areas))
        image, boxes, labels = synthetic.draw_image(np.random.default_rng([9, i]), 64, 12)
        assert labels.tolist() == classes and boxes.dtype == np.float32 and image.dtype == np.uint8
        for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int).tolist()):
            inside = owner[y1:y2, x1:x2] == j
            assert inside.sum() == visible[j]  # all visible pixels lie in the box ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # ... tightly


def test_finished_dataset_is_reused_and_changed_settings_regenerate(tmp_path, monkeypatch):
    data_yaml = generate(tmp_path / "ds", seed=0, **SMALL)
    before = tree_bytes(data_yaml.parent)

    def boom(*args, **kwargs):
        raise AssertionError("regenerated a finished dataset")

    monkeypatch.setattr(synthetic, "draw_image", boom)
    assert generate(tmp_path / "ds", seed=0, **SMALL) == data_yaml
    monkeypatch.undo()
    assert tree_bytes(data_yaml.parent) == before
    generate(tmp_path / "ds", seed=1, **SMALL)  # other settings: rewritten in place
    after = tree_bytes(data_yaml.parent)
    assert after["images/train/000000.png"] != before["images/train/000000.png"]
    assert b'"seed": 1' in after["synthetic.json"]


def test_refuses_to_replace_a_foreign_folder_and_bad_settings(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        generate(tmp_path / "mine", seed=0, **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="n_train=-1"):
        generate(tmp_path / "x", n_train=-1, n_val=1, n_test=1)
    with pytest.raises(DataError, match="image_size=16"):
        generate(tmp_path / "x", n_train=1, n_val=1, n_test=1, image_size=16)


def test_loads_with_load_yolo(tmp_path):
    data_yaml = generate(tmp_path / "ds", seed=0, **SMALL)
    split = load_yolo(data_yaml, "train", 64)
    assert len(split) == 8 and split.images.shape == (8, 64, 64, 3)
    assert split.names == list(CLASS_NAMES)
    rows = np.loadtxt(data_yaml.parent / "labels/train/000000.txt", ndmin=2)
    cx, cy, w, h = rows[:, 1:].T * 64
    np.testing.assert_allclose(split.boxes[0], np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), atol=1e-3)
    np.testing.assert_array_equal(split.classes[0], rows[:, 0].astype(int))
    with Image.open(data_yaml.parent / "images/train/000000.png") as im:
        np.testing.assert_array_equal(split.images[0], np.asarray(im))
    assert len(load_yolo(data_yaml, "test", 96)) == 2  # letterboxed up to another size
