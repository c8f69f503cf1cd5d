"""Object detection's own recipe section (``detection:``), added to ``edgekd.recipe.Recipe`` through
``RECIPE``. Pydantic only: a recipe loads without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekd.sections import Section


class SyntheticConfig(Section):
    """The built-in synthetic detection set (data.dataset: synthetic-shapes): seeded shapes of several
    classes, sizes and overlaps on textured backgrounds, written once in YOLO format and reused."""

    train: int = Field(1600, ge=1, description="Training images.")
    validation: int = Field(200, ge=1, description="Validation images.")
    test: int = Field(300, ge=1, description="Test images.")
    max_objects: int = Field(6, ge=1, le=50, description="Most objects in one image.")
    seed: int = Field(0, description="Seed of the generator; the same seed gives byte-identical images.")


class DetectionConfig(Section):
    """Object detection (task: detection): image size, the synthetic set, and the weights of the
    detector distillation terms (the student's own detection loss always has weight 1)."""

    image_size: int = Field(128, ge=32, le=2048, multiple_of=32,
                            description="Square input size (images are letterboxed to it); a multiple of 32.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    cls_weight: float = Field(1.0, ge=0, description="Class-score KD per location (temperature distill.temperature).")
    box_weight: float = Field(1.0, ge=0, description="KD on the box distributions (DFL bins), per location.")
    feature_weight: float = Field(1.0, ge=0, description="Feature imitation on the neck outputs (0 = off).")
    feature_method: Literal["cwd", "mgd", "mse"] = Field(
        "cwd",
        description="cwd: channel-wise distillation (spatial softmax per channel, KL); mgd: masked generative "
        "distillation (a generator rebuilds the teacher's feature from the masked student's); mse: plain MSE. "
        "Each through a learned 1x1 projector.",
    )
    # The exports' post-processing: each detection export records the three in its artifact.json
    # (``postprocess``), where the server and edgekd.load(...).predict read their defaults.
    conf_threshold: float = Field(
        0.25, gt=0, lt=1,
        description="Score below which a box is dropped: recorded in every detection export's artifact.json "
        "(postprocess) as the default conf_threshold of POST /predict and edgekd.load(...).predict (a request's "
        "own value wins), and export parity's box agreement compares the boxes scoring at least this. mAP is "
        "always measured at 0.001 (COCO).",
    )
    iou_threshold: float = Field(
        0.6, gt=0, lt=1,
        description="NMS IoU threshold: recorded in every detection export's artifact.json (postprocess) as the "
        "default iou_threshold of POST /predict and edgekd.load(...).predict (a request's own value wins), and "
        "built into the onnx-nms graph (nms_in_graph). mAP is measured after NMS at 0.6 (the onnx-nms export's: "
        "its graph's).",
    )
    max_det: int = Field(
        100, ge=1, le=1000,  # serving's MAX_DET_LIMIT: the most a request may ask for
        description="Most boxes kept per image: recorded in every detection export's artifact.json (postprocess) "
        "as the default max_det of POST /predict and edgekd.load(...).predict (a request's own value wins), and "
        "the size of the onnx-nms graph's detections output (nms_in_graph). mAP is always scored on at most 100.",
    )
    nms_in_graph: bool = Field(
        False, description="Also export ONNX with NMS inside the graph (fixed-size detections output) to "
        "export/onnx-nms; its score threshold is mAP's (0.001), the server filters by conf_threshold."
    )


class DetectionSection(Section):
    detection: DetectionConfig = Field(default_factory=DetectionConfig)


RECIPE = DetectionSection
