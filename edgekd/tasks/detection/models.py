"""The built-in YOLOv8-style detectors, in pure torch (no Ultralytics, no torchvision).

A C2f backbone with SPPF, a PAN/FPN neck and an anchor-free decoupled head whose box branch
predicts a Distribution Focal Loss (DFL) distribution over ``reg_max`` bins per box side, at
strides 8, 16 and 32. Two presets: ``edgekd-det-l`` (the teacher) and ``edgekd-det-s`` (the
student), sized to train on a couple of CPU cores at 128 px.

Export wrappers (``DetectionExport``, ``DetectionExportNMS``) contain only plain tensor ops with
no data-dependent Python control flow, so ONNX, ExecuTorch, Core ML and TorchScript see the same
graph. The forward pass never reads channel counts from the config, so a channel-pruned detector
(narrower Conv2d/BatchNorm2d layers swapped in) still runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import AssetError, EdgeKDError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "edgekd-detector"
DEFAULT_STRIDES = (8, 16, 32)


# ---------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class DetectorConfig:
    """Architecture of a detector; everything needed to rebuild it before loading its weights.

    ``channels`` are the widths of the stem and of the stride 4, 8, 16 and 32 stages (the neck
    outputs have the stride 8/16/32 widths); ``depths`` the number of bottlenecks of the C2f block
    of each stage after the stem; ``neck_depth`` those of each neck C2f. ``box_channels`` and
    ``cls_channels`` are the hidden widths of the head branches (0: YOLOv8's rule).
    ``image_size`` is the training/export size; the model runs at any multiple of 32.
    """

    num_classes: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 2, 2, 1)
    neck_depth: int = 1
    reg_max: int = 16
    strides: tuple[int, ...] = DEFAULT_STRIDES
    image_size: int = 128
    box_channels: int = 0
    cls_channels: int = 0

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and comparable.
        self.channels = tuple(int(c) for c in self.channels)
        self.depths = tuple(int(d) for d in self.depths)
        self.strides = tuple(int(s) for s in self.strides)
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.channels) != 5 or min(self.channels) < 1:
            problems.append(f"channels must be 5 positive widths (stem, stride 4, 8, 16, 32), got {self.channels}")
        if len(self.depths) != 4 or min(self.depths) < 0:
            problems.append(f"depths must be 4 bottleneck counts (stride 4, 8, 16, 32), got {self.depths}")
        if self.strides != DEFAULT_STRIDES:
            problems.append(f"strides must be {DEFAULT_STRIDES} (the backbone's P3-P5 outputs), got {self.strides}")
        if self.reg_max < 2:
            problems.append(f"reg_max must be >= 2 (DFL bins), got {self.reg_max}")
        if self.image_size < 32 or self.image_size % 32:
            problems.append(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if problems:
            raise EdgeKDError("Invalid detector config: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("channels", "depths", "strides"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeKDError(f"Unknown detector config keys {unknown}; known: {sorted(known)}. "
                              "Was the folder saved by a newer edgekd?")
        return cls(**d)


PRESETS: dict[str, DetectorConfig] = {
    # ~YOLOv8n widths and depths: the teacher.
    "edgekd-det-l": DetectorConfig(channels=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1), neck_depth=1),
    # Half the widths, one bottleneck per stage, narrower head: the student.
    "edgekd-det-s": DetectorConfig(channels=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1), neck_depth=1,
                                   box_channels=32),
}


# ---------------------------------------------------------------------------------------------
# Building blocks (YOLOv8 layout, so weights and FLOPs compare with the paper's figures)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, YOLOv8's BN settings (eps 1e-3, momentum 0.03)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP with two convolutions and every bottleneck's output concatenated (YOLOv8).

    The entry conv is two 1x1 convs (``cv0``, ``cv1``) instead of one conv whose output is
    chunked in two: the same function, but torch-pruning's dependency graph can prune each half
    on its own (a chunk of a pruned tensor would split it in the wrong place)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        c = max(c2 // 2, 1)
        self.cv0 = Conv(c1, c, 1)
        self.cv1 = Conv(c1, c, 1)
        self.cv2 = Conv((2 + n) * c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c = c1 // 2
        self.cv1 = Conv(c1, c, 1)
        self.cv2 = Conv(c * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Backbone(nn.Module):
    def __init__(self, ch: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__()
        c0, c1, c2, c3, c4 = ch
        self.stem = Conv(3, c0, 3, 2)  # stride 2
        self.stage2 = nn.Sequential(Conv(c0, c1, 3, 2), C2f(c1, c1, depths[0], True))  # 4
        self.stage3 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, depths[1], True))  # 8
        self.stage4 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, depths[2], True))  # 16
        self.stage5 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, depths[3], True), SPPF(c4, c4))  # 32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class Neck(nn.Module):
    """PAN/FPN: top-down (upsample + concat) then bottom-up (strided conv + concat)."""

    def __init__(self, ch: tuple[int, int, int], n: int):
        super().__init__()
        c3, c4, c5 = ch
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, n)
        self.td3 = C2f(c4 + c3, c3, n)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, n)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, n)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> list[torch.Tensor]:
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return [n3, n4, n5]


class Head(nn.Module):
    """Anchor-free decoupled head: per level a box branch (4*reg_max DFL logits) and a class branch."""

    def __init__(self, ch: tuple[int, ...], num_classes: int, reg_max: int, box_channels: int, cls_channels: int):
        super().__init__()
        cb = box_channels or max(16, ch[0] // 4, reg_max * 4)
        cc = cls_channels or max(ch[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, cb, 3), Conv(cb, cb, 3), nn.Conv2d(cb, 4 * reg_max, 1)) for c in ch
        )
        self.cls = nn.ModuleList(
            nn.Sequential(Conv(c, cc, 3), Conv(cc, cc, 3), nn.Conv2d(cc, num_classes, 1)) for c in ch
        )


# ---------------------------------------------------------------------------------------------
# Anchors and DFL decoding


def make_anchors(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres in input pixels [N,2] (x, y) and their stride [N,1], level by level, row-major."""
    points, stride_t = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx, yy], -1).reshape(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_t)


def dfl_expectation(dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """DFL logits [..., 4*reg_max] -> expected distance per side [..., 4], in stride units."""
    shape = dist.shape[:-1]
    prob = dist.reshape(*shape, 4, reg_max).float().softmax(-1)
    bins = torch.arange(reg_max, device=dist.device, dtype=prob.dtype)
    return (prob * bins).sum(-1)


def dist_to_boxes(ltrb: torch.Tensor, anchors: torch.Tensor, stride_tensor: torch.Tensor) -> torch.Tensor:
    """Distances (l, t, r, b) in stride units from anchor centres (pixels) -> xyxy boxes in pixels."""
    lt, rb = ltrb.chunk(2, -1)
    return torch.cat([anchors - lt * stride_tensor, anchors + rb * stride_tensor], -1)


# ---------------------------------------------------------------------------------------------
# The detector


class Detector(nn.Module):
    """YOLOv8-style detector. ``forward`` returns raw outputs for training and distillation:

    ``feats`` (neck outputs, one per stride), ``cls`` [B,N,C] class logits, ``dist`` [B,N,4*reg_max]
    DFL logits, N = sum of H*W over the levels (row-major, stride 8 first). ``decode`` turns
    ``dist`` into xyxy boxes in input pixels.
    """

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        self.backbone = Backbone(ch, config.depths)
        self.neck = Neck((ch[2], ch[3], ch[4]), config.neck_depth)
        self.head = Head((ch[2], ch[3], ch[4]), config.num_classes, config.reg_max,
                         config.box_channels, config.cls_channels)
        self._grid_cache: dict[tuple[int, int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_size = (config.image_size, config.image_size)
        self.init_biases()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def reg_max(self) -> int:
        return self.config.reg_max

    @property
    def strides(self) -> tuple[int, ...]:
        return self.config.strides

    @property
    def feat_channels(self) -> list[int]:
        """Channels of each neck output, read from the layers (right after channel pruning too)."""
        return [m.cv2.conv.out_channels for m in (self.neck.td3, self.neck.bu4, self.neck.bu5)]

    def init_biases(self) -> None:
        """YOLOv8's bias prior: box logits start flat-ish, class scores start at about 5 objects per
        image spread over the cells of a level, so the early BCE is not swamped by background."""
        size = self.config.image_size
        for box, cls, s in zip(self.head.box, self.head.cls, self.strides, strict=True):
            nn.init.constant_(box[-1].bias, 1.0)
            nn.init.constant_(cls[-1].bias, math.log(5 / self.num_classes / (size / s) ** 2))

    # -- anchors -------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors [N,2] in pixels, stride_tensor [N,1]) for an input of ``height`` x ``width``, cached."""
        if height % 32 or width % 32:
            raise EdgeKDError(f"Detector inputs must be multiples of 32 pixels, got {height}x{width}; "
                              "letterbox images to the model's image_size.")
        p = next(self.parameters())
        key = (int(height), int(width), str(p.device), torch.float32)
        if key not in self._grid_cache:
            sizes = [(height // s, width // s) for s in self.strides]
            self._grid_cache[key] = make_anchors(sizes, self.strides, device=p.device)
        return self._grid_cache[key]

    @property
    def anchors(self) -> torch.Tensor:
        """Cell centres in pixels [N,2] for the last input size seen (initially ``image_size``)."""
        return self.grid(*self._last_size)[0]

    @property
    def stride_tensor(self) -> torch.Tensor:
        """Stride of each cell [N,1] for the last input size seen."""
        return self.grid(*self._last_size)[1]

    # -- forward / decode ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        feats = self.neck(*self.backbone(images))
        b = images.shape[0]
        cls = torch.cat([h(f).flatten(2) for h, f in zip(self.head.cls, feats, strict=True)], 2)
        dist = torch.cat([h(f).flatten(2) for h, f in zip(self.head.box, feats, strict=True)], 2)
        if not torch.compiler.is_compiling():  # no attribute side effects while exporting
            self._last_size = (int(images.shape[-2]), int(images.shape[-1]))
        return {
            "feats": feats,
            "cls": cls.reshape(b, self.num_classes, -1).transpose(1, 2),
            "dist": dist.reshape(b, 4 * self.reg_max, -1).transpose(1, 2),
        }

    def decode(
        self, dist: torch.Tensor, anchors: torch.Tensor | None = None, stride_tensor: torch.Tensor | None = None
    ) -> torch.Tensor:
        """DFL logits [B,N,4*reg_max] -> xyxy boxes [B,N,4] in input pixels (expectation over bins).

        Anchors default to those of the last input size seen by ``forward``.
        """
        if anchors is None or stride_tensor is None:
            anchors, stride_tensor = self.anchors, self.stride_tensor
        return dist_to_boxes(dfl_expectation(dist, self.reg_max), anchors, stride_tensor)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [B,N,4] xyxy pixels, scores [B,N,C] probabilities): what export targets return."""
        out = self(images)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in out["feats"]]
        anchors, stride_t = make_anchors(sizes, self.strides, device=images.device)
        return self.decode(out["dist"], anchors, stride_t), out["cls"].float().sigmoid()


# ---------------------------------------------------------------------------------------------
# Build / save / load


def build_detector(preset_or_config: str | DetectorConfig, num_classes: int, image_size: int) -> Detector:
    """A freshly initialised detector from a preset name or a config (num_classes/image_size override)."""
    if isinstance(preset_or_config, DetectorConfig):
        base = preset_or_config
    elif str(preset_or_config) in PRESETS:
        base = PRESETS[str(preset_or_config)]
    else:
        raise AssetError(f"Unknown detector preset '{preset_or_config}'; choose one of {', '.join(PRESETS)} "
                         "or pass a DetectorConfig.")
    return Detector(replace(base, num_classes=int(num_classes), image_size=int(image_size)))


def save_detector(model: Detector, out_dir: str | Path, names: list[str] | None = None,
                  category_ids: list[int] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` in one rename (atomic); ``names``
    (the class names it was trained on, in class-id order) are recorded in config.json, so a folder is
    refused on data whose classes differ (``saved_class_names``), and so are ``category_ids`` (the
    dataset's id of each class, COCO's category_id, in class-id order; ``saved_category_ids``), when the
    data named them."""
    from safetensors.torch import save_file

    from edgekd.runfolder import atomic_dir

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_dict(), "feat_channels": model.feat_channels}
    if names is not None:
        if len(names) != model.num_classes:
            raise EdgeKDError(f"save_detector got {len(names)} class names for a detector of {model.num_classes} "
                              "classes.")
        meta["names"] = [str(n) for n in names]
    if category_ids is not None:
        if len(category_ids) != model.num_classes:
            raise EdgeKDError(f"save_detector got {len(category_ids)} category ids for a detector of "
                              f"{model.num_classes} classes.")
        meta["category_ids"] = [int(i) for i in category_ids]
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def saved_class_names(path: str | Path) -> list[str] | None:
    """The class names a saved detector records; None for a folder saved before they were recorded."""
    try:
        names = json.loads((Path(path) / CONFIG_FILE).read_text()).get("names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def saved_category_ids(path: str | Path) -> list[int] | None:
    """The dataset category id of each class a saved detector records (COCO data); None when its data
    named none (YOLO) or it was saved before they were recorded."""
    try:
        ids = json.loads((Path(path) / CONFIG_FILE).read_text()).get("category_ids")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return list(ids)


def is_detector_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``save_detector``."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT and (path / WEIGHTS_FILE).is_file()


def load_detector(path: str | Path) -> Detector:
    """Rebuild a detector saved by ``save_detector`` (in eval mode).

    A state dict whose shapes differ from the config (a channel-pruned model) raises torch's
    RuntimeError, which callers that rebuild pruned layers catch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not is_detector_dir(path):
        raise AssetError(f"{path} is not an edgekd detector folder (expected {CONFIG_FILE} with "
                         f"format '{FORMAT}' and {WEIGHTS_FILE}); save one with save_detector.")
    meta = json.loads((path / CONFIG_FILE).read_text())
    model = Detector(DetectorConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# NMS: greedy reference and the in-graph (export-friendly) Cluster-NMS


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes [..., n, 4] x [..., m, 4] -> [..., n, m]."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter + eps)


def nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, classes: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy NMS [n,4], [n] -> int64 indices kept, best first; a box is dropped when its IoU with a
    kept, better box exceeds ``iou_threshold``. With ``classes``, only boxes of one class compete.
    The reference for ``select_detections``; not for export (data-dependent loop)."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    if classes is not None:
        c = classes[order]
        iou = iou * (c[:, None] == c[None, :])
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    max_det: int = 100,
    iou_threshold: float = 0.6,
    score_threshold: float = 0.25,
    pre_nms_topk: int = 300,
    iterations: int = 16,
) -> torch.Tensor:
    """Fixed-size detections [B, max_det, 6] (x1, y1, x2, y2, score, class; padded rows all 0).

    Each location proposes its best class; the ``pre_nms_topk`` best locations go through
    class-aware Cluster-NMS (Zheng et al. 2021): Fast-NMS iterated with only the boxes kept so far
    allowed to suppress. Each iteration settles one more link of a suppression chain, so after
    enough iterations it equals greedy NMS; real detector outputs settle in 2-5, ``iterations``
    is a margin. Only sort/top-k, gather, elementwise and reductions: no data-dependent shapes.
    Class-aware via a same-class mask on the IoU matrix (exact; coordinate offsets lose float
    precision on small boxes).
    """
    n = boxes.shape[1]
    k = min(int(pre_nms_topk), n)
    conf, cls = scores.max(-1)
    conf, idx = conf.topk(k, dim=1)  # sorted, best first
    cls = cls.gather(1, idx)
    cand = boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
    valid = (conf > score_threshold).to(conf.dtype)
    iou = box_iou(cand, cand)
    upper = torch.ones(k, k, dtype=iou.dtype, device=iou.device).triu(1)  # i suppresses j only if i < j
    iou = iou * upper * (cls.unsqueeze(2) == cls.unsqueeze(1)).to(iou.dtype)
    keep = valid
    for _ in range(int(iterations)):
        worst = (iou * keep.unsqueeze(2)).amax(1)  # max IoU with a kept, better box of the same class
        keep = valid * (worst <= iou_threshold).to(valid.dtype)
    final = conf * keep
    m = min(int(max_det), k)
    top, order = final.topk(m, dim=1)
    present = (top > 0).to(top.dtype).unsqueeze(-1)
    det = torch.cat([
        cand.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)),
        top.unsqueeze(-1),
        cls.gather(1, order).unsqueeze(-1).to(top.dtype),
    ], -1) * present
    if m < max_det:
        det = F.pad(det, (0, 0, 0, int(max_det) - m))
    return det


def reference_detections(
    boxes: torch.Tensor, scores: torch.Tensor, *, max_det: int = 100, iou_threshold: float = 0.6,
    score_threshold: float = 0.25, pre_nms_topk: int = 300,
) -> torch.Tensor:
    """``select_detections`` computed with greedy ``nms_torch`` per image (for tests and checks)."""
    out = torch.zeros(boxes.shape[0], max_det, 6, dtype=boxes.dtype)
    k = min(pre_nms_topk, boxes.shape[1])
    for b in range(boxes.shape[0]):
        conf, cls = scores[b].max(-1)
        conf, idx = conf.topk(k)
        cls, cand = cls[idx], boxes[b][idx]
        ok = conf > score_threshold
        conf, cls, cand = conf[ok], cls[ok], cand[ok]
        kept = nms_torch(cand, conf, iou_threshold, classes=cls)[:max_det]
        out[b, : len(kept)] = torch.cat([cand[kept], conf[kept, None], cls[kept, None].to(boxes.dtype)], -1)
    return out


# ---------------------------------------------------------------------------------------------
# Export wrappers


class DetectionExport(nn.Module):
    """What every export target sees: images [B,3,S,S] in 0..1 -> (boxes [B,N,4] xyxy pixels,
    scores [B,N,C] sigmoid probabilities). NMS runs on the host."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(images)


class DetectionExportNMS(nn.Module):
    """images -> (detections [B, max_det, 6],): rows (x1, y1, x2, y2, score, class), best first,
    padded rows all zeros; NMS in the graph (see ``select_detections``)."""

    def __init__(
        self, model: Detector, *, max_det: int = 100, iou_threshold: float = 0.6, score_threshold: float = 0.25,
        pre_nms_topk: int = 300, iterations: int = 16,
    ):
        super().__init__()
        self.model = model
        self.eval()
        self.kw = dict(max_det=max_det, iou_threshold=iou_threshold, score_threshold=score_threshold,
                       pre_nms_topk=pre_nms_topk, iterations=iterations)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        boxes, scores = self.model.predict(images)
        return (select_detections(boxes, scores, **self.kw),)
