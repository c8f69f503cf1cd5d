"""How a detection image becomes the RGB pixels a detector sees, the same for the datasets that train
and evaluate it (``data``) and for what is served (``codec``, ``edgekd.load(...).predict``).

Upright: the EXIF orientation is applied (``ImageOps.exif_transpose``, as Ultralytics and phone photo
viewers do), so a portrait photo stored sideways is trained on and served the way it is seen. 8-bit
RGB: a 16-bit greyscale image (a depth map, a thermal or medical scan) is rescaled to 0..255, never
clipped at 255 (Pillow's own ``convert`` would make everything above 255 white). Pillow and numpy
only: no torch, nothing of the server.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2-8 mirrored and/or turned by 90/180/270 degrees
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")


def orientation(im: Image.Image) -> int:
    """``im``'s EXIF orientation (1..8); 1 when it has none or an invalid one."""
    value = im.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """``im`` as a viewer shows it: its EXIF orientation applied, and dropped from the copy (so applying
    it again changes nothing); ``im`` itself when it is upright already."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit greyscale is scaled by 255/65535; a 32-bit integer image ("I") by
    the same when it holds values above 255, else taken as 8-bit values (an 8-bit image read as "I")."""
    if im.mode in (*SIXTEEN_BIT_MODES, "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode in SIXTEEN_BIT_MODES or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray((arr.clip(0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def rgb_pixels(im: Image.Image) -> np.ndarray:
    """``im`` upright, as an H x W x 3 uint8 RGB array: what every path feeds the detector."""
    return np.asarray(to_rgb(upright(im)), dtype=np.uint8)


def orient_boxes(xyxy: np.ndarray, turn: int, width: int, height: int) -> np.ndarray:
    """Boxes ``xyxy`` [k,4] in the pixels of a ``width`` x ``height`` image as stored, moved to where
    ``upright`` puts them for EXIF orientation ``turn`` (the upright image is height x width for 5-8)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    if turn == 1:
        return b
    w, h = float(width), float(height)
    corners = []
    for x, y in ((b[:, 0], b[:, 1]), (b[:, 2], b[:, 3])):
        corners.append({
            2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x),
            6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x),
        }[turn])
    (xa, ya), (xb, yb) = corners
    return np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1)
