"""The run context of a detection recipe: the same run folder and stage contracts as text, with
images instead of tokens.

Data: ``data.dataset`` is ``synthetic-shapes`` (generated once from ``detection.synthetic`` into the
edgekd cache, seeded), a YOLO ``data.yaml`` (train/val/test folders; a set without ``test`` is
scored on ``val`` and the manifest says so) or a COCO ``instances.json`` (cut into train/validation/
test by ``data.split``, seeded).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.context import RunContext
from edgekd.errors import DataError, ParityError, StageError
from edgekd.runfolder import fingerprint
from edgekd.tasks.detection.task import LEGACY_POSTPROCESS, DetectionTask

SYNTHETIC = "synthetic-shapes"
YOLO_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class DetectionRunContext(RunContext):
    # --- data ---------------------------------------------------------------------------------
    @cached_property
    def dataset_path(self) -> Path:
        d, det = self.recipe.data, self.recipe.detection
        if d.dataset == SYNTHETIC:
            from edgekd.assets import cache_dir
            from edgekd.tasks.detection.synthetic import generate

            s = det.synthetic
            key = fingerprint({"synthetic": s.model_dump(mode="json"), "size": det.image_size})[:12]
            return generate(cache_dir() / SYNTHETIC / key, n_train=s.train, n_val=s.validation, n_test=s.test,
                            image_size=det.image_size, seed=s.seed, max_objects=s.max_objects)
        path = Path(d.dataset)
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise DataError(f"data.dataset '{d.dataset}' is not a detection dataset: use '{SYNTHETIC}', a YOLO "
                            "data.yaml, or a COCO annotations .json.")
        if not path.is_file():
            raise DataError(f"data.dataset {path} does not exist: give the path of a YOLO data.yaml or a COCO "
                            "annotations .json (relative to the folder you run edgekd from).")
        return path

    @cached_property
    def _yolo_spec(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.dataset_path.read_text()) or {}

    def _yolo_has(self, split: str) -> bool:
        return bool(self._yolo_spec.get(split))

    def split(self, name: str):
        """``train``, ``validation`` or ``test`` as a DetectionSplit (images in memory, loaded once)."""
        cache = self.__dict__.setdefault("_splits", {})
        if name not in cache:
            from edgekd.tasks.detection.data import load_coco, load_yolo

            size = self.recipe.detection.image_size
            path = self.dataset_path
            if path.suffix.lower() == ".json":
                whole = cache.get("_coco") or load_coco(path, None, size)
                cache["_coco"] = whole
                cache[name] = _subset(whole, self._coco_indices(len(whole))[name])
            else:
                key = YOLO_SPLITS[name]
                if name == "test" and not self._yolo_has("test"):
                    key = "val"  # scored on val; data_summary records it
                cache[name] = load_yolo(path, key, size)
            if len(cache[name]) == 0:
                raise DataError(f"the {name} split of {path} holds no images: check the dataset's folders.")
        return cache[name]

    def _coco_indices(self, n: int) -> dict[str, np.ndarray]:
        sp = self.recipe.data.split
        order = np.random.default_rng(sp.seed).permutation(n)
        n_val, n_test = max(1, round(n * sp.validation)), max(1, round(n * sp.test))
        if n - n_val - n_test < 1:
            raise DataError(f"{self.dataset_path} has {n} images: too few to cut train/validation/test.")
        return {"validation": np.sort(order[:n_val]), "test": np.sort(order[n_val:n_val + n_test]),
                "train": np.sort(order[n_val + n_test:])}

    @cached_property
    def data_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.recipe.data.dataset, "path": str(self.dataset_path),
                               "image_size": self.recipe.detection.image_size, "classes": self.task.label_names}
        for name in ("train", "validation", "test"):
            sp = self.split(name)
            out[name] = {"images": len(sp), "boxes": int(sum(len(b) for b in sp.boxes))}
        if self.dataset_path.suffix.lower() != ".json" and not self._yolo_has("test"):
            out["note"] = "the dataset has no test split: test figures are on its val split"
        return out

    @cached_property
    def data_fingerprint(self) -> str:
        """The recipe's data settings, the summary and, for a YOLO or COCO set, each split's contents
        (``DetectionSplit.digest``: pixels, boxes, classes and file names in order), so a fixed label,
        a moved box or a replaced image redoes the stages that read them. The synthetic set is
        generated from its settings, which are hashed already: its fingerprint is what it was."""
        synthetic = self.recipe.data.dataset == SYNTHETIC
        parts: dict[str, Any] = {"data": self.recipe.data.model_dump(mode="json"),
                                 "detection_data": self.recipe.detection.synthetic.model_dump(mode="json")
                                 if synthetic else None,
                                 "summary": self.data_summary}
        if not synthetic:
            parts["contents"] = {name: self.split(name).digest() for name in ("train", "validation", "test")}
        return fingerprint(parts)

    @cached_property
    def task(self) -> DetectionTask:
        det = self.recipe.detection
        train = self.split("train")
        return DetectionTask(train.names, det.image_size, conf_threshold=det.conf_threshold,
                             iou_threshold=det.iou_threshold, max_det=det.max_det, category_ids=train.category_ids)

    @property
    def export_settings(self) -> dict[str, Any]:
        """The ``detection.*`` keys the export stage reads (``edgekd.stages.export.export_fingerprint``
        hashes them beside ``export.*``): the post-processing every export records and parity uses, and
        the onnx-nms export. A key at the value every export made before the fingerprint covered them
        behaves by (no onnx-nms, post-processing 0.25/0.6/100) is left out, so those run folders keep
        their export; any other value changes the fingerprint. A COCO set's category ids, which every
        export records (``DetectionTask.export_meta``), are hashed too: a renumbered category is exported
        again, and so is a COCO run exported before they were recorded."""
        det = self.recipe.detection
        legacy = {**LEGACY_POSTPROCESS, "nms_in_graph": False}
        own: dict[str, Any] = {k: getattr(det, k) for k, v in legacy.items() if getattr(det, k) != v}
        if self.task.category_ids is not None:
            own["category_ids"] = list(self.task.category_ids)
        return own

    def parity_data(self, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Real test images (letterboxed, 0..1) and their ground truth boxes."""
        test = self.split("test")
        idx = np.arange(len(test) if n is None else min(n, len(test)))
        return {"images": test.collate(idx)["images"]}, test.ground_truth(idx)

    def validation_data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        val = self.split("validation")
        return {"images": val.collate(np.arange(len(val)))["images"]}, val.ground_truth()

    def calibration_data(self, split: str, n: int) -> dict[str, np.ndarray]:
        """``n`` images of the train or validation split (never test), a sample seeded by the recipe's seed
        (``calibration_rows``; the whole split when it has at most ``n``), never the first ``n`` in file
        order (a folder sorted by class would calibrate on one). Its ``rows`` say which, for the report."""
        from edgekd.quantization.calibration import CalibrationInputs, calibration_record, calibration_rows

        if split not in ("train", "validation"):
            raise StageError(f"calibration reads the train or validation split, not {split!r}")
        part = self.split(split)
        seed = self.recipe.seed
        idx = calibration_rows(len(part), n, seed)
        out = CalibrationInputs({"images": part.collate(idx)["images"]})
        out.rows = calibration_record(split, len(part), idx, seed, stratified=False)
        return out

    def input_desc(self) -> str | None:
        s = self.recipe.detection.image_size
        return f"image {s}x{s}"

    # --- export ---------------------------------------------------------------------------------
    def extra_exports(self, model, inputs, labels, meta, staging=None) -> dict[str, dict[str, Any]]:
        """``detection.nms_in_graph``: ONNX whose graph ends in NMS (Cluster-NMS, fixed-size
        ``detections`` output of ``detection.max_det`` rows, ``detection.iou_threshold``) in
        export/onnx-nms, with the same parity checks. Its score threshold is mAP's (0.001): the server
        filters by the export's recorded ``conf_threshold`` (``postprocess`` in its artifact.json).

        ``staging`` (the export stage's ``Staging``): the folder is staged there and published with
        export.targets' folders, all or nothing. Without it (called alone), as for export.targets
        (``edgekd.export.stage``): a failure recorded (export.strict: false) or raised removes an earlier
        run's export/onnx-nms, which must not be served or benched as if current; a parity threshold miss
        leaves this run's folder there for inspection, with ``parity.passed: false`` (which serve, bench and
        edgekd.load refuse), and raises ParityError with the record on it (``.records``)."""
        det, r = self.recipe.detection, self.recipe
        if not det.nms_in_graph:
            return {}
        if "onnx" not in r.export.targets:
            raise StageError("detection.nms_in_graph exports ONNX: add onnx to export.targets.")
        from edgekd.export.stage import Staging, drop_stale, export_all
        from edgekd.tasks.detection.models import DetectionExportNMS
        from edgekd.tasks.detection.task import NMS_IO

        module = DetectionExportNMS(model, max_det=det.max_det, iou_threshold=det.iou_threshold,
                                    score_threshold=0.001)
        root = self.run.stage_dir("export")
        final = root / "onnx-nms"
        own = staging is None
        stage = Staging(root) if own else staging
        miss: ParityError | None = None
        try:
            records = export_all(module, NMS_IO, ["onnx"], root, r.export, inputs, labels, self.task.metrics,
                                 {**meta, "nms_in_graph": True}, [], self.task.agreement,
                                 staging=stage.renamed({"onnx": "onnx-nms"}), unordered_outputs=("detections",))
        except ParityError as e:
            if getattr(e, "records", None) is None:  # not a threshold miss: nothing was exported
                if own:
                    stage.discard()
                    drop_stale(final)
                raise
            records, miss = e.records, e  # a threshold miss: the folder is written, its figures in it
        except BaseException:
            if own:
                stage.discard()
                drop_stale(final)
            raise
        if own:
            stage.publish()
        rec = {**records["onnx"], "target": "onnx-nms"}
        if miss is not None:
            err = ParityError(str(miss).replace("'onnx':", "'onnx-nms':"))
            err.records = {"onnx-nms": rec}  # type: ignore[attr-defined]
            raise err
        return {"onnx-nms": rec}


def _subset(split, idx: np.ndarray):
    from edgekd.tasks.detection.data import DetectionSplit

    return DetectionSplit(images=split.images[idx], boxes=[split.boxes[i] for i in idx],
                          classes=[split.classes[i] for i in idx], names=split.names,
                          files=[split.files[i] for i in idx], image_size=split.image_size,
                          crowd=[split.crowd[i] for i in idx], category_ids=split.category_ids)
