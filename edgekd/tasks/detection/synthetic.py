"""A seeded synthetic detection set: shapes on textured backgrounds, written in YOLO format.

It lets the detection pipeline run end to end offline and in seconds, with labels that are exact.
The classes differ by shape only (colours are random per object), backgrounds carry gradients,
stripes, soft blobs and noise, sizes range from ~8 px to half the image, and objects may overlap:
a label keeps the box of what is still visible, and a placement that would hide more than half of
an earlier object is retried elsewhere, so no label points at a hidden object.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgekd.errors import DataError
from edgekd.runfolder import atomic_dir

CLASS_NAMES = ("circle", "square", "triangle", "cross")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when the drawing changes, so datasets on disk are regenerated
SETTINGS_FILE = "synthetic.json"

_MIN_VISIBLE = 0.5  # an object must keep at least this fraction of its pixels visible
_PLACEMENT_TRIES = 20


def generate(
    out_dir: Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 6,
) -> Path:
    """Write the dataset to ``out_dir`` (or reuse it) and return the path of its ``data.yaml``.

    The same arguments give byte-identical files, and each image depends only on (seed, split,
    index), so changing ``n_val`` leaves the training images as they were. The files are written to
    a temporary sibling folder and renamed into place, so an interrupted run leaves nothing half
    written; a finished dataset with the same settings (``synthetic.json``) is returned as is.
    """
    out_dir = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    problems = [f"n_{k}={v} (must be >= 0)" for k, v in counts.items() if v < 0]
    if image_size < 32:
        problems.append(f"image_size={image_size} (must be >= 32, so the smallest shapes stay recognisable)")
    if max_objects < 1:
        problems.append(f"max_objects={max_objects} (must be >= 1)")
    if problems:
        raise DataError("Invalid synthetic dataset settings: " + "; ".join(problems) + ".")
    settings = {
        "generator": "edgekd-synthetic-shapes",
        "version": FORMAT_VERSION,
        "counts": counts,
        "image_size": image_size,
        "seed": seed,
        "max_objects": max_objects,
        "names": list(CLASS_NAMES),
    }
    data_yaml = out_dir / "data.yaml"
    marker = out_dir / SETTINGS_FILE
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == settings and data_yaml.is_file():
            return data_yaml
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(
            f"{out_dir} exists and is not a synthetic dataset written by edgekd (no {SETTINGS_FILE}); "
            "refusing to replace it. Pick an empty or new folder for the synthetic data."
        )

    final = out_dir.resolve()
    with atomic_dir(final) as tmp:
        for split_no, split in enumerate(SPLITS):
            img_dir, lbl_dir = tmp / "images" / split, tmp / "labels" / split
            img_dir.mkdir(parents=True)
            lbl_dir.mkdir(parents=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_no, i])
                image, boxes, classes = draw_image(rng, image_size, max_objects)
                (img_dir / f"{i:06d}.png").write_bytes(_png_bytes(image))
                (lbl_dir / f"{i:06d}.txt").write_text(_yolo_lines(boxes, classes, image_size))
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
        (tmp / "data.yaml").write_text(
            "# Synthetic shapes written by edgekd (edgekd.tasks.detection.synthetic); Ultralytics format.\n"
            f"path: {json.dumps(str(final))}\n"
            "train: images/train\nval: images/val\ntest: images/test\n"
            f"names:\n{names}\n"
        )
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return data_yaml


def draw_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (HWC uint8, visible boxes xyxy float32 [k,4] in pixels, classes int64 [k])."""
    image, owner, classes, _ = _draw(rng, size, max_objects)
    boxes = []
    for j in range(len(classes)):
        ys, xs = np.nonzero(owner == j)  # never empty: placement keeps half of every object visible
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def _draw(
    rng: np.random.Generator, size: int, max_objects: int
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(image, owner map: index of the object visible at each pixel or -1, class and full pixel
    area of each object)."""
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the object that shows at each pixel
    areas: list[int] = []
    classes: list[int] = []
    min_side = max(6.0, size / 16)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        side = float(np.exp(rng.uniform(np.log(min_side), np.log(size / 2))))
        aspect = float(np.exp(rng.uniform(-0.15, 0.15)))
        w = int(np.clip(round(side * aspect), 4, size))
        h = int(np.clip(round(side / aspect), 4, size))
        mask = _shape_mask(cls, w, h, rng)
        visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]
        for _try in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            under = owner[y0 : y0 + h, x0 : x0 + w][mask]
            covered = np.bincount(under + 1, minlength=len(areas) + 1)[1:]
            if np.all(visible - covered >= _MIN_VISIBLE * np.asarray(areas, dtype=np.float64)):
                break
        else:
            continue  # no free spot: leave this object out rather than hide another
        window = image[y0 : y0 + h, x0 : x0 + w]
        window[mask] = _object_pixels(rng, window[mask], h, w, mask)
        owner[y0 : y0 + h, x0 : x0 + w][mask] = len(areas)
        areas.append(int(mask.sum()))
        classes.append(cls)
    # sensor noise on top; luminance only, which keeps PNG encoding fast
    image += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(6)
    image = image.clip(0, 255).astype(np.uint8)
    return image, owner, classes, areas


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + stripes + soft blobs, float32 HWC in 0..255 (noise is added after the shapes).

    Each term is a grey 2-D field (built from 1-D profiles) times an RGB colour, so the whole image
    is one small matrix product: [H*W, K] fields @ [K, 3] colours, well under a millisecond.
    """
    x = (np.arange(size, dtype=np.float32) + 0.5) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x[None, :] + np.sin(angle) * x[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    fields, colors = [np.ones_like(t), t], [c0, c1 - c0]
    if rng.random() < 0.7:  # stripes at a random angle and period: sin(p + q) from 1-D sines and cosines
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 40) / size
        p, q = 2 * np.pi * np.cos(a) * x / period, 2 * np.pi * np.sin(a) * x / period
        fields.append(np.sin(q)[:, None] * np.cos(p)[None, :] + np.cos(q)[:, None] * np.sin(p)[None, :])
        colors.append(rng.uniform(8, 30) * rng.choice([-1.0, 1.0], 3))
    for _ in range(int(rng.integers(0, 5))):  # soft blobs: large and blurry, unlike the hard-edged shapes
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        gx, gy = np.exp(-((x - cx) ** 2) / (2 * r * r)), np.exp(-((x - cy) ** 2) / (2 * r * r))
        fields.append(gy[:, None] * gx[None, :])
        colors.append(rng.uniform(-80, 80, 3))
    stacked = np.stack(fields, axis=-1).reshape(size * size, len(fields)).astype(np.float32)
    return (stacked @ np.asarray(colors, dtype=np.float32)).reshape(size, size, 3)


def _shape_mask(cls: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [h,w] mask of one shape filling its box, sampled at pixel centres."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (u + 0.5) / w, (v + 0.5) / h  # 0..1 across the box
    name = CLASS_NAMES[cls]
    if name == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if name == "square":
        return np.ones((h, w), dtype=bool)
    if name == "triangle":  # isosceles, pointing up, down, left or right
        k = int(rng.integers(4))
        along, across = (v, u) if k < 2 else (u, v)
        along = along if k % 2 == 0 else 1 - along
        return np.abs(across - 0.5) <= along / 2 + 0.5 / max(w, h)
    if name == "cross":
        half = rng.uniform(0.14, 0.2)
        return (np.abs(u - 0.5) <= half) | (np.abs(v - 0.5) <= half)
    raise AssertionError(f"no drawing for class {name!r}")


def _object_pixels(rng: np.random.Generator, under: np.ndarray, h: int, w: int, mask: np.ndarray) -> np.ndarray:
    """Colours of an object's pixels: a random colour far enough from what it covers, lightly shaded."""
    below = under.mean(0)
    color = rng.uniform(0, 255, 3)
    if np.abs(color - below).mean() < 60:  # too close to the background: push it away
        color = np.where(below > 127, below - 110, below + 110).clip(0, 255)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    shade = 1 + rng.uniform(0, 0.25) * ((np.cos(a) * u / w + np.sin(a) * v / h) - 0.5)
    return (color[None, :] * shade[mask][:, None]).clip(0, 255).astype(np.float32)


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG with fixed options and no metadata, so the bytes depend on the pixels only."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _yolo_lines(boxes: np.ndarray, classes: np.ndarray, size: int) -> str:
    """YOLO label lines: ``cls cx cy w h``, normalised to 0..1, 6 decimals."""
    lines = []
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), classes.tolist(), strict=True):
        cx, cy, bw, bh = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
        lines.append(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return "".join(f"{line}\n" for line in lines)
