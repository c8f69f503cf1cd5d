"""Object detection: the task object the stages, exporters, benchmark and server talk to.

Models are the built-in YOLO-style detectors (``edgekd-det-l``, ``edgekd-det-s``) or a detector
folder saved by edgekd (also after channel pruning, when its layers are narrower than the preset).
Export modules take ``images`` float32 [B,3,S,S] in 0..1 and return ``boxes`` [B,N,4] (xyxy, input
pixels) and ``scores`` [B,N,C] (class probabilities); NMS runs on the host (``boxes_np``), or in the
graph for the ``nms_in_graph`` ONNX variant. Every export records the recipe's post-processing
(``detection.conf_threshold``, ``iou_threshold``, ``max_det``) in its artifact.json as ``postprocess``:
the server and ``edgekd.load(...).predict`` answer a request that leaves an option out with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekd.errors import RecipeError, StageError
from edgekd.export.base import ModelIO

DETECTION_IO = ModelIO(
    input_names=["images"],
    output_names=["boxes", "scores"],
    dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
    dtypes={"images": "float32"},
)

# NMS in the graph: one fixed-size output of rows (x1, y1, x2, y2, score, class), padding score 0.
NMS_IO = ModelIO(
    input_names=["images"],
    output_names=["detections"],
    dynamic_axes={"images": {0: "batch"}, "detections": {0: "batch"}},
    dtypes={"images": "float32"},
)


def _resize_to_state(model, state: dict[str, Any]) -> None:
    """Narrow the Conv2d/BatchNorm2d layers of a freshly built detector to the widths stored in
    ``state`` (a channel-pruned model keeps its preset's structure with fewer channels per layer)."""
    from torch import nn

    for name, module in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if w is None:
            continue
        if isinstance(module, nn.Conv2d) and tuple(w.shape) != tuple(module.weight.shape):
            groups = module.groups if module.groups == 1 else int(w.shape[0])  # depthwise stays depthwise
            new = nn.Conv2d(w.shape[1] * groups, w.shape[0], module.kernel_size, module.stride, module.padding,
                            module.dilation, groups, bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d) and w.shape[0] != module.num_features:
            new = nn.BatchNorm2d(w.shape[0], module.eps, module.momentum)
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)


# What a detection export without a ``postprocess`` entry (written before it was recorded) is served
# with: the recipe's defaults then, and the server's own defaults (serving.schemas.DetectOptions).
LEGACY_POSTPROCESS: dict[str, float | int] = {"conf_threshold": 0.25, "iou_threshold": 0.6, "max_det": 100}


class DetectionTask:
    name = "detection"
    primary_metric = "map50_95"

    def __init__(self, label_names: list[str], image_size: int = 128, *, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.6, max_det: int = 100, category_ids: list[int] | None = None):
        self.label_names = list(label_names)
        self.image_size = int(image_size)
        # The dataset's id of each class (COCO category_id, in class-id order); None when the data names
        # none (YOLO), and then no saved model or export claims one.
        if category_ids is not None and len(category_ids) != len(self.label_names):
            raise StageError(f"{len(category_ids)} category ids for {len(self.label_names)} classes "
                             f"({', '.join(self.label_names)}): give one id per class, in class-id order.")
        self.category_ids = None if category_ids is None else [int(i) for i in category_ids]
        # The recipe's detection.conf_threshold, iou_threshold, max_det: the exports' post-processing.
        self.postprocess: dict[str, float | int] = {"conf_threshold": float(conf_threshold),
                                                    "iou_threshold": float(iou_threshold), "max_det": int(max_det)}

    # --- models -------------------------------------------------------------------------------
    @staticmethod
    def is_preset(source: str | Path) -> bool:
        from edgekd.tasks.detection.models import PRESETS

        return str(source) in PRESETS

    def has_task_head(self, source: str | Path) -> bool:
        """A saved detector folder is trained; a preset name is a fresh model to train."""
        return not self.is_preset(source)

    def load_model(self, source: str | Path, num_labels: int | None = None):
        from edgekd.tasks.detection.models import PRESETS, build_detector, is_detector_dir, saved_class_names

        if self.is_preset(source):
            return build_detector(str(source), len(self.label_names), self.image_size)
        path = Path(source)
        if path.is_dir() and is_detector_dir(path):
            model = load_detector_any(path)
            if model.num_classes != len(self.label_names):
                raise StageError(f"{path} detects {model.num_classes} classes, the dataset has "
                                 f"{len(self.label_names)} ({', '.join(self.label_names)}): use a detector "
                                 "trained on this dataset, or a preset name to train one.")
            names = saved_class_names(path)  # None: saved before names were recorded, judged by count
            if names is not None and names != list(self.label_names):
                raise StageError(f"{path} was trained on the classes [{', '.join(names)}], the dataset has "
                                 f"[{', '.join(self.label_names)}] (names, in class-id order, must match): use "
                                 "a detector trained on this dataset's classes, or a preset name to train one.")
            return model
        if str(source).endswith((".yaml", ".yml", ".pt")) and "edgekd-det" not in str(source):
            raise StageError(
                f"'{source}' looks like an Ultralytics YOLO model: the pipeline's detection stages run the "
                f"built-in detectors ({', '.join(PRESETS)}) or an edgekd detector folder; YOLO teachers and "
                "students are distilled with edgekd.tasks.detection.yolo.distill_yolo (pip install "
                "'edgekd[yolo]'), see the README's detection section.")
        raise StageError(f"no detector at '{source}': give a preset ({', '.join(PRESETS)}) or a folder "
                         "saved by edgekd (config.json + model.safetensors).")

    def save_model(self, model, out_dir: Path) -> None:
        from edgekd.tasks.detection.models import save_detector

        save_detector(model, out_dir, names=list(self.label_names), category_ids=self.category_ids)

    # --- export / parity / serving --------------------------------------------------------------
    def model_io(self) -> ModelIO:
        return DETECTION_IO

    def export_module(self, model):
        from edgekd.tasks.detection.models import DetectionExport

        return DetectionExport(model.eval())

    def shipped_module(self, model, cfg, inputs: dict[str, np.ndarray]):
        """Detection exports ``export_module`` as it is."""
        if cfg.first_token_last_layer:
            raise RecipeError(["export.first_token_last_layer: applies to text classifiers only; leave it out "
                               "of a detection recipe"])
        return self.export_module(model), {}

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        """COCO mAP@0.5:0.95 and mAP@0.5 (pycocotools) from raw outputs."""
        from edgekd.tasks.detection.metrics import detection_metrics

        return detection_metrics(outputs, labels)

    def agreement(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
        """Parity: the share of live locations (scoring at least ``conf_threshold``) where both give the
        same class, score and box (IoU >= 0.9); after NMS for an NMS-in-graph export."""
        from edgekd.tasks.detection.metrics import box_agreement

        return box_agreement(got, want, **self.postprocess)

    def export_meta(self) -> dict[str, Any]:
        """What every detection export's artifact.json records beside its own fields: the input size, the
        post-processing the server applies when a request leaves an option out and, for data that names
        them (COCO), the dataset's category id of each class (``category_ids``, in class-id order), which
        predictions then carry beside the class index."""
        meta: dict[str, Any] = {"image_size": self.image_size, "input": "image", "postprocess": dict(self.postprocess)}
        if self.category_ids is not None:
            meta["category_ids"] = list(self.category_ids)
        return meta

    # Export option defaults of this task (the recipe's export.options override them): XNNPACK plans a
    # detector's convolution subgraphs for the traced batch only, so a dynamic ExecuTorch program was
    # lowered (about a minute for the tiny detector), found planned for that batch, and lowered again
    # at fixed shapes; export it at fixed shapes at once (its runner feeds any batch row by row).
    export_defaults: ClassVar[dict[str, dict[str, Any]]] = {"executorch": {"dynamic": False}}


def load_detector_any(path: Path):
    """A saved detector, preset-shaped or channel-pruned: layers narrower than the config's are rebuilt
    to the widths stored in the weights (a no-op for an unpruned detector)."""
    import json

    from safetensors.torch import load_file

    from edgekd.tasks.detection.models import CONFIG_FILE, WEIGHTS_FILE, Detector, DetectorConfig

    model = Detector(DetectorConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["config"]))
    state = load_file(str(path / WEIGHTS_FILE))
    _resize_to_state(model, state)
    model.load_state_dict(state)
    return model.eval()
