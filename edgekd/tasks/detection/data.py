"""Detection datasets (YOLO or COCO layout) loaded once into memory, letterboxed, and batched.

Images are read as the server reads them (``detection.images``: EXIF orientation applied, 16-bit
greyscale rescaled to 8 bits) and letterboxed to the model's square input when loaded, so training,
evaluation, export parity and serving all see the same pixels, and boxes are kept in those letterboxed
pixels. A split of a few thousand small images fits in memory (2000 x 128 px = 98 MB), which keeps
every epoch free of decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from edgekd.errors import DataError
from edgekd.tasks.detection.boxes_np import letterbox
from edgekd.tasks.detection.images import orient_boxes, orientation, rgb_pixels, upright

IMAGE_EXTENSIONS = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".mpo"})


@dataclass
class DetectionSplit:
    """One split in memory: letterboxed images and their boxes (xyxy, letterboxed pixels)."""

    images: np.ndarray  # uint8 [N,S,S,3] RGB
    boxes: list[np.ndarray]  # float32 [k,4] per image
    classes: list[np.ndarray]  # int64 [k] per image
    names: list[str]
    files: list[str]
    image_size: int
    # COCO crowd regions (``iscrowd: 1``), float32 [c,5] (cls, x1, y1, x2, y2) per image: never trained
    # on, scored as COCO does (a detection on one is neither a hit nor a false positive). Empty if none.
    crowd: list[np.ndarray] = field(default_factory=list)
    # The dataset's own id of each class (COCO ``category_id``, index = class id); None when the data
    # names none (YOLO: its class ids are the indices). Saved detectors and exports record it.
    category_ids: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not self.crowd:
            self.crowd = [np.zeros((0, 5), np.float32) for _ in range(n)]
        if not (len(self.boxes) == len(self.classes) == len(self.files) == len(self.crowd) == n):
            raise ValueError(
                f"DetectionSplit parts differ in length: {n} images, {len(self.boxes)} box arrays, "
                f"{len(self.classes)} class arrays, {len(self.files)} files, {len(self.crowd)} crowd arrays"
            )
        if self.category_ids is not None and len(self.category_ids) != len(self.names):
            raise ValueError(f"DetectionSplit has {len(self.names)} class names but {len(self.category_ids)} category ids")

    def digest(self) -> str:
        """sha256 of what the split holds, in order: class names, file names, the letterboxed pixels,
        and each image's boxes, classes and crowd regions. Any edit to a label, a box or an image
        changes it, as does reordering the images; it costs one pass over the split in memory."""
        h = hashlib.sha256()
        h.update(json.dumps({"names": list(self.names), "files": list(self.files), "size": self.image_size,
                             "shape": list(self.images.shape)}).encode())
        h.update(np.ascontiguousarray(self.images, dtype=np.uint8).tobytes())
        for b, c, crowd in zip(self.boxes, self.classes, self.crowd, strict=True):
            for a, dtype in ((b, np.float32), (c, np.int64), (crowd, np.float32)):
                a = np.ascontiguousarray(a, dtype=dtype)
                h.update(np.int64(a.size).tobytes())
                h.update(a.tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.images)

    def train_batches(self, batch_size: int, seed: int) -> list[np.ndarray]:
        """Shuffled index batches (the last one may be smaller; no image is dropped)."""
        _check_batch_size(batch_size)
        order = np.random.default_rng(seed).permutation(len(self)).astype(np.int64)
        return [order[i : i + batch_size] for i in range(0, len(self), batch_size)]

    def eval_batches(self, batch_size: int) -> list[np.ndarray]:
        """Index batches in dataset order, so predictions line up with ``ground_truth()``."""
        _check_batch_size(batch_size)
        order = np.arange(len(self), dtype=np.int64)
        return [order[i : i + batch_size] for i in range(0, len(self), batch_size)]

    def collate(self, idx: np.ndarray | list[int], flip_seed: int | None = None) -> dict[str, np.ndarray]:
        """Model inputs and padded targets for the images ``idx``.

        ``images`` float32 [B,3,S,S] in 0..1; ``gt_boxes`` float32 [B,M,4], ``gt_classes`` int64
        [B,M] and ``gt_mask`` float32 [B,M] (1 = real box), M = most boxes in the batch (at least 1,
        so the shapes stay valid for a batch of empty images). With ``flip_seed``, each image is
        mirrored left-right with probability 1/2 (seeded, so an epoch can be replayed); the pipeline's
        stages pass none, so every detection run trains on the images as they were loaded.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        size = self.image_size
        images = self.images[idx]
        flips = (
            np.random.default_rng(flip_seed).random(len(idx)) < 0.5
            if flip_seed is not None
            else np.zeros(len(idx), dtype=bool)
        )
        if flips.any():
            images = images.copy()
            images[flips] = images[flips, :, ::-1]
        m = max([1, *(len(self.boxes[i]) for i in idx)])
        gt_boxes = np.zeros((len(idx), m, 4), dtype=np.float32)
        gt_classes = np.zeros((len(idx), m), dtype=np.int64)
        gt_mask = np.zeros((len(idx), m), dtype=np.float32)
        for row, i in enumerate(idx):
            b = self.boxes[i]
            if flips[row]:
                b = np.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], axis=1)
            gt_boxes[row, : len(b)] = b
            gt_classes[row, : len(b)] = self.classes[i]
            gt_mask[row, : len(b)] = 1
        return {
            "images": images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255),
            "gt_boxes": gt_boxes,
            "gt_classes": gt_classes,
            "gt_mask": gt_mask,
        }

    def ground_truth(self, idx: np.ndarray | list[int] | None = None) -> np.ndarray:
        """Labels for the metrics: an object array with one float32 [k,5] (cls, x1, y1, x2, y2) per image;
        an image with crowd regions (COCO) gets [k+c,6] rows instead, the 6th column its iscrowd (0 or 1),
        which ``coco_map`` passes to pycocotools as such.

        Built with ``np.empty(n, dtype=object)`` so that ``np.asarray(labels)[:n]`` slices images,
        whatever the box counts (numpy would otherwise try to stack equal-sized arrays).
        """
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty(len(idx), dtype=object)
        for row, i in enumerate(idx):
            rows = np.concatenate(
                [self.classes[i].astype(np.float32)[:, None], self.boxes[i].astype(np.float32)], axis=1
            ).reshape(-1, 5)
            crowd = np.asarray(self.crowd[i], np.float32).reshape(-1, 5)
            if len(crowd):
                rows = np.concatenate([np.pad(rows, ((0, 0), (0, 1))),
                                       np.pad(crowd, ((0, 0), (0, 1)), constant_values=1)]).astype(np.float32)
            out[row] = rows
        return out


def load_detection_split(dataset: str | Path, split: str, image_size: int) -> DetectionSplit:
    """Load ``split`` of a YOLO ``data.yaml`` (.yaml/.yml; a folder holding one also works) or of a
    COCO annotations file (.json; ``split`` is ignored: one file is one split)."""
    path = Path(dataset)
    if path.is_dir() and (path / "data.yaml").is_file():
        path = path / "data.yaml"
    if not path.exists():
        raise DataError(
            f"Detection dataset {path} does not exist: give a YOLO data.yaml (Ultralytics format) or a COCO "
            "annotations .json."
        )
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return load_yolo(path, split, image_size)
    if suffix == ".json":
        return load_coco(path, None, image_size)
    raise DataError(
        f"Detection dataset {path} is neither a YOLO data.yaml (.yaml/.yml) nor a COCO annotations file "
        "(.json); point data.dataset at one of those."
    )


# ---------------------------------------------------------------------------------------------
# YOLO (Ultralytics) layout


def class_names(dataset: str) -> list[str] | None:
    """The class names of ``data.dataset`` read without its images (the generated set's, a data.yaml's
    ``names``, a COCO file's categories in id order), for checks made before any stage runs; None when
    the file cannot be read so (the stage that loads it says why)."""
    from edgekd.tasks.detection.synthetic import CLASS_NAMES

    if dataset == "synthetic-shapes":
        return list(CLASS_NAMES)
    path = Path(dataset)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            spec = yaml.safe_load(path.read_text())
            return _yolo_names(spec, path) if isinstance(spec, dict) else None
        if path.suffix.lower() == ".json":
            cats = json.loads(path.read_text())["categories"]
            by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
            return [by_id[i] for i in sorted(by_id)] or None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, DataError):
        return None
    return None


def load_yolo(data_yaml: Path, split: str, image_size: int) -> DetectionSplit:
    """One split of an Ultralytics dataset: ``data.yaml`` with ``path``, ``train``/``val``/``test``
    (folders, list files, or lists of them) and ``names`` (list, or dict id -> name).

    Labels sit where Ultralytics looks for them: the image path with its last ``/images/`` replaced
    by ``/labels/`` and its extension by ``.txt``; an image without a label file has no boxes.
    Images are EXIF-rotated as Ultralytics reads them (and as served), so labels match.
    """
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise DataError(f"YOLO dataset file {data_yaml} does not exist: expected an Ultralytics data.yaml.")
    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"Cannot read {data_yaml} as YAML ({e}); fix the file or regenerate the dataset.") from None
    if not isinstance(spec, dict):
        raise DataError(f"{data_yaml} is not a mapping; expected keys path, train, val, test, names.")
    names = _yolo_names(spec, data_yaml)
    if spec.get(split) in (None, ""):
        have = [k for k in ("train", "val", "test") if spec.get(k)]
        raise DataError(
            f"{data_yaml} has no '{split}' entry (it has: {', '.join(have) or 'none'}); add '{split}: <folder or "
            "list file>' or pick another split."
        )
    root = _yolo_root(spec, data_yaml)
    entries = spec[split] if isinstance(spec[split], list) else [spec[split]]
    image_files: list[Path] = []
    for entry in entries:
        image_files += _yolo_images(root / str(entry), data_yaml, split)
    if not image_files:
        raise DataError(
            f"The '{split}' split of {data_yaml} has no images ({', '.join(str(root / str(e)) for e in entries)}); "
            f"expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}."
        )
    records = []
    for f in image_files:
        label_file = _label_path(f)
        rows = _read_yolo_labels(label_file, len(names)) if label_file.is_file() else np.zeros((0, 5), np.float32)
        records.append((f, str(f), rows))
    return _assemble(records, names, image_size, normalized=True)


def _yolo_names(spec: dict[str, Any], data_yaml: Path) -> list[str]:
    names = spec.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            ids = []
        if ids != list(range(len(names))):
            raise DataError(
                f"'names' in {data_yaml} must map the ids 0..{len(names) - 1} to class names, got keys "
                f"{list(names)}; number the classes from 0 without gaps."
            )
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(spec.get("nc"), int) and spec["nc"] > 0:
        return [f"class{i}" for i in range(spec["nc"])]
    raise DataError(f"{data_yaml} has no class names: add 'names' (a list, or a dict id -> name).")


def _yolo_root(spec: dict[str, Any], data_yaml: Path) -> Path:
    """The dataset root: ``path`` (relative to the yaml's folder), or the yaml's folder.

    An absolute ``path`` that no longer exists (the dataset was moved) falls back to the yaml's
    folder, where a self-contained dataset keeps its splits.
    """
    here = data_yaml.resolve().parent
    given = spec.get("path")
    if not given:
        return here
    root = Path(str(given)).expanduser()
    if not root.is_absolute():
        return here / root
    return root if root.exists() else here


def _yolo_images(source: Path, data_yaml: Path, split: str) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if source.is_file() and source.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
        files = [p if p.is_absolute() else source.parent / p for p in map(Path, lines)]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {source} do not exist (first: {missing[0]}); paths in a list "
                "file are absolute or relative to the list file's folder."
            )
        return files
    raise DataError(
        f"The '{split}' entry of {data_yaml} points at {source}, which is not a folder of images or a .txt list "
        "of image paths; fix 'path' or the split entry."
    )


def _label_path(image: Path) -> Path:
    s = str(image)
    sep = f"{os.sep}images{os.sep}"
    if sep in s:
        head, tail = s.rsplit(sep, 1)
        s = f"{head}{os.sep}labels{os.sep}{tail}"
    return Path(s).with_suffix(".txt")


def _read_yolo_labels(path: Path, num_classes: int) -> np.ndarray:
    """Rows (cls, x1, y1, x2, y2) normalised to 0..1; polygon (segment) rows become their bounding box."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{where}: '{line.strip()}' is not numbers; expected 'cls cx cy w h' (normalised).") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DataError(
                f"{where}: class {parts[0]} is not one of the ids 0..{num_classes - 1} named in data.yaml; fix "
                "the label or add the class to 'names'."
            )
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(values) >= 7 and len(values) % 2 == 1:
            xy = np.asarray(values[1:]).reshape(-1, 2)
            box = [*xy.min(0), *xy.max(0)]
        else:
            raise DataError(
                f"{where}: expected 'cls cx cy w h' (5 numbers) or a polygon 'cls x1 y1 x2 y2 ...', got "
                f"{len(values)} numbers."
            )
        if max(abs(v) for v in values[1:]) > 1.01:
            raise DataError(
                f"{where}: coordinates {parts[1:]} are above 1; YOLO labels are normalised by the image size "
                "(divide pixel values by the width and height)."
            )
        rows.append([cls, *box])
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


# ---------------------------------------------------------------------------------------------
# COCO layout


def load_coco(annotations_json: Path, images_dir: Path | None, image_size: int) -> DetectionSplit:
    """A COCO detection file: bbox ``[x, y, w, h]`` -> xyxy, category ids mapped to 0..C-1 in sorted
    id order (names from ``categories``). Crowd annotations (``iscrowd: 1``) mark regions of many
    objects: they are kept apart (``DetectionSplit.crowd``), never trained on, and passed to mAP as
    crowd regions, as pycocotools scores them (a detection on one is neither a hit nor a false positive).

    ``images_dir`` defaults to the json's folder's ``images/`` if it exists, else the json's folder
    (``file_name`` relative to it).
    """
    annotations_json = Path(annotations_json)
    if not annotations_json.is_file():
        raise DataError(f"COCO annotations file {annotations_json} does not exist: expected a COCO .json.")
    try:
        coco = json.loads(annotations_json.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read {annotations_json} as JSON ({e}); fix or re-export the annotations.") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco, dict) or k not in coco]
    if missing:
        raise DataError(
            f"{annotations_json} lacks the COCO key(s) {', '.join(missing)}; expected a detection file with images, "
            "annotations and categories."
        )
    if images_dir is None:
        images_dir = annotations_json.parent / "images"
        if not images_dir.is_dir():
            images_dir = annotations_json.parent
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"COCO images folder {images_dir} does not exist; pass the folder holding the file_names.")
    cat_ids = sorted(int(c["id"]) for c in coco["categories"])
    if not cat_ids:
        raise DataError(f"{annotations_json} has no categories; a detection dataset needs at least one class.")
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    names_by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in coco["categories"]}
    rows: dict[int, list[list[float]]] = {int(img["id"]): [] for img in coco["images"]}
    crowd: dict[int, list[list[float]]] = {int(img["id"]): [] for img in coco["images"]}
    for ann in coco["annotations"]:
        image_id, cat = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in rows:
            raise DataError(f"{annotations_json}: annotation {ann.get('id')} refers to image {image_id}, not in 'images'.")
        if cat not in cat_index:
            raise DataError(f"{annotations_json}: annotation {ann.get('id')} has category {cat}, not in 'categories'.")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w > 0 and h > 0:
            (crowd if ann.get("iscrowd", 0) else rows)[image_id].append([cat_index[cat], x, y, x + w, y + h])
    records, crowd_rows = [], []
    for img in coco["images"]:
        f = images_dir / img["file_name"]
        size = (img["width"], img["height"]) if "width" in img and "height" in img else None
        records.append((f, str(img["file_name"]), np.asarray(rows[int(img["id"])], np.float32).reshape(-1, 5), size))
        crowd_rows.append(np.asarray(crowd[int(img["id"])], np.float32).reshape(-1, 5))
    absent = [str(r[0]) for r in records if not r[0].is_file()]
    if absent:
        raise DataError(
            f"{len(absent)} image(s) of {annotations_json} are missing (first: {absent[0]}); file_name is read "
            f"relative to {images_dir}."
        )
    return _assemble(records, [names_by_id[c] for c in cat_ids], image_size, normalized=False,
                     crowd=crowd_rows, category_ids=cat_ids)


# ---------------------------------------------------------------------------------------------


def _assemble(
    records: list[tuple], names: list[str], image_size: int, *, normalized: bool,
    crowd: list[np.ndarray] | None = None, category_ids: list[int] | None = None,
) -> DetectionSplit:
    """Decode, letterbox and map boxes into letterboxed pixels; records are (path, name, rows[, (w, h)]);
    ``crowd``: per record, its crowd rows (cls, x1, y1, x2, y2), mapped the same way."""
    images = np.empty((len(records), image_size, image_size, 3), dtype=np.uint8)
    boxes, classes, files, crowds = [], [], [], []
    for n, (path, name, rows, *expected) in enumerate(records):
        pixels, turn, stored = _read_image(path, expected[0] if expected else None)
        h, w = pixels.shape[:2]
        images[n], scale, (px, py) = letterbox(pixels, image_size)
        b, c = _place(_turned(rows, turn, stored), w, h, scale, px, py, normalized)
        boxes.append(b)
        classes.append(c)
        files.append(name)
        if crowd is not None:
            cb, cc = _place(_turned(crowd[n], turn, stored), w, h, scale, px, py, normalized)
            crowds.append(np.concatenate([cc.astype(np.float32)[:, None], cb], axis=1).reshape(-1, 5))
    return DetectionSplit(images, boxes, classes, list(names), files, image_size, crowd=crowds,
                          category_ids=None if category_ids is None else [int(i) for i in category_ids])


def _turned(rows: np.ndarray, turn: int, stored: tuple[int, int]) -> np.ndarray:
    """Rows (cls, x1, y1, x2, y2) in the stored pixels of an image moved into its upright pixels."""
    if turn == 1 or not len(rows):
        return rows
    return np.concatenate([rows[:, :1], orient_boxes(rows[:, 1:], turn, *stored)], axis=1).astype(np.float32)


def _place(rows: np.ndarray, w: int, h: int, scale: float, px: float, py: float,
           normalized: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows (cls, x1, y1, x2, y2) of a w x h image -> boxes in letterboxed pixels and their classes."""
    xyxy = rows[:, 1:].astype(np.float64)
    if normalized:
        xyxy = xyxy * [w, h, w, h]
    xyxy = (xyxy.clip(0, [w, h, w, h]) * scale + [px, py, px, py]).astype(np.float32)
    ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # boxes wholly outside the image vanish
    return xyxy[ok].reshape(-1, 4), rows[ok, 0].astype(np.int64)


def _read_image(path: Path, expected: tuple[int, int] | None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Upright RGB pixels of ``path`` (``detection.images.rgb_pixels``: EXIF orientation applied, as
    served); with the EXIF orientation its labels still need (1: none) and the stored size.

    Labels describe the upright image, as Ultralytics and detectron2 read them, unless COCO's ``width``
    and ``height`` (``expected``) are those of the pixels as stored and not of the upright image: the
    annotation tool then ignored EXIF, and the boxes are turned with the image."""
    try:
        with Image.open(path) as im:
            im.load()
            stored, shown = im.size, upright(im)
            if expected is not None and tuple(expected) not in (shown.size, stored):
                raise DataError(
                    f"{path} is {shown.size[0]}x{shown.size[1]} but its annotations say {expected[0]}x{expected[1]}; "
                    "the boxes would be misplaced. Fix width/height in the json or use the original image."
                )
            on_stored = expected is not None and tuple(expected) != shown.size
            return rgb_pixels(shown), orientation(im) if on_stored else 1, stored
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"Cannot decode image {path} ({e}); replace or remove it.") from None


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
