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
    conf_threshold: float = Field(0.25, gt=0, lt=1, description="Score below which a box is dropped (serving, parity).")
    iou_threshold: float = Field(0.6, gt=0, lt=1, description="NMS IoU threshold.")
    max_det: int = Field(100, ge=1, description="Most boxes kept per image.")
    nms_in_graph: bool = Field(
        False, description="Also export ONNX with NMS inside the graph (fixed-size detections output)."
    )


class DetectionSection(Section):
    detection: DetectionConfig = Field(default_factory=DetectionConfig)


RECIPE = DetectionSection
