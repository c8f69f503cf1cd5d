"""Object detection as a task family: its run context, its own stages and its recipe checks."""

from __future__ import annotations

from pathlib import Path

from edgekd.recipe import Recipe
from edgekd.runfolder import RunFolder
from edgekd.sections import changed_keys, it_or_them
from edgekd.stages.base import Stage, eval_inputs
from edgekd.tasks.detection.context import SYNTHETIC, DetectionRunContext
from edgekd.tasks.detection.stages import (
    eval_fingerprint,
    prune_fingerprint,
    run_eval,
    run_prune,
    run_student_stage,
    run_teacher,
    student_fingerprint,
    teacher_fingerprint,
)

STAGES = {
    "teacher": Stage("teacher", run_teacher, teacher_fingerprint, produces_model=True),
    "distill": Stage("distill", lambda c: run_student_stage(c, "distill"), lambda c: student_fingerprint(c, "distill"),
                     produces_model=True, inputs=lambda r: ("teacher",)),
    # the same student trained without the teacher: it reads no stage's result
    "baseline": Stage("baseline", lambda c: run_student_stage(c, "baseline"),
                      lambda c: student_fingerprint(c, "baseline"), enabled=lambda r: r.baseline.enabled,
                      read_only_when_on=True, produces_model=True),
    "eval": Stage("eval", run_eval, eval_fingerprint, inputs=eval_inputs),
    "prune": Stage("prune", run_prune, prune_fingerprint, enabled=lambda r: r.prune.enabled, produces_model=True,
                   read_only_when_on=True,
                   inputs=lambda r: ("teacher", "distill")),
}


_TEXT_DATA = "only a text dataset is read with it; a detector reads the images of data.dataset (sized by detection.*)"
_TEXT_DISTILL = ("only a text student's distillation reads it; a detector distils with detection.cls_weight, "
                 "box_weight and feature_weight (at distill.temperature)")
_TEXT_SERVE = ("only a text server reads it; a detection server's limits are serve.max_images and "
               "max_image_pixels")
_TEACHER = ("a detector distils from one local teacher detector (teacher.kind: model); black-box teachers, "
            "ensembles and their targets are for text classification")

# Recipe keys a detection run never reads (edgekd.recipe_check refuses them when set).
UNREAD_KEYS = {
    **dict.fromkeys(("data.source", "data.hub_config", "data.text_column", "data.label_column", "data.max_length",
                     "data.max_train_examples", "data.normalize_labels", "data.drop_duplicates"), _TEXT_DATA),
    **dict.fromkeys(("distill.alpha", "distill.kl", "distill.hidden_weight", "distill.hidden_loss",
                     "distill.attention_weight"), _TEXT_DISTILL),
    "distill.rounds": "born-again rounds of distillation are for text classification; a detector distils once",
    **dict.fromkeys(("eval.ood_dataset", "eval.ood_min_abs_score"), "only text classification scores an "
                    "out-of-domain set; a detector is scored on its own test images"),
    **dict.fromkeys(("teacher.kind", "teacher.ensemble", "teacher.targets"), _TEACHER),
    "export.first_token_last_layer": "only a text classifier's last block can run on the first position "
                                     "alone; a detector has no such block",
    **dict.fromkeys(("serve.max_items", "serve.max_length", "serve.overflow"), _TEXT_SERVE),
    "prune.quant_aware": "the detection prune stage does not train int8-aware (text classification does)",
    "teacher.unlabelled.dataset": "extra unlabelled texts are for text classification; a detector's teacher labels "
                                  "the training images only",
    "teacher.augment.copies": "perturbed copies of training texts are for text classification; a detector trains "
                              "on its training images as they are loaded (no augmented copies)",
    "prune.recover_fresh_copies": "perturbed copies of training texts are for text classification; a detector "
                                  "recovers on its own training images",
    "prune.recover_soft_targets": "it chooses a text recovery's soft targets; a detector recovers against its teacher",
    "prune.recover_alpha": "it weighs a text recovery's soft targets against its labels; a detector recovers with "
                           "its own detection and distillation losses",
    "prune.recover_temperature": "it softens a text recovery's soft targets; a detector recovers with its own "
                                 "detection and distillation losses (at distill.temperature)",
    "quantize.embedding_bits": "it shrinks the embedding tables of a text encoder; a detector has none",
    "quantize.fuse": "ONNX Runtime's transformer fusions find nothing to fuse in a detector's convolutions, and "
                     "packed finds no self-attention block to pack",
    "quantize.smooth_alpha": "it smooths the inputs of MatMuls over float weights (a transformer's layers); a "
                             "detector's graph is convolutions and has none",
    "student.layers": "it picks the teacher layers a text student keeps; a detector's student is the one "
                      "student.model names",
    **dict.fromkeys(("bench.seq_lengths", "bench.inputs", "bench.synthetic_vocab_size"), "only a text model is timed "
                    "at set sequence lengths or on synthetic token ids; a detector is timed on its test images at "
                    "detection.image_size"),
}


class Detection:
    name = "detection"
    skipped: dict[str, str] = {}
    unread_keys = UNREAD_KEYS
    metric_names = ("map50_95", "map50")

    def create_context(self, recipe: Recipe) -> DetectionRunContext:
        return DetectionRunContext(recipe=recipe, run=RunFolder(recipe.run_dir()), family=self)

    def stages(self) -> dict[str, Stage]:
        return dict(STAGES)

    def check_inputs(self, recipe: Recipe) -> list[str]:
        """A YOLO data.yaml must exist (the generated set and COCO files are checked when loaded); data.split
        only for a COCO file, detection.synthetic only for the generated set; student.model a detector the
        family builds; KD settings only where a KD term reads them; a pruning method for a transformer, a
        candidate's transformer-only quantize settings and the ONNX export's transformer fusions
        (export.options.onnx.optimize) refused (keys it never reads: UNREAD_KEYS)."""
        problems = []
        d = recipe.data.dataset
        if d.endswith((".yaml", ".yml")) and not Path(d).expanduser().is_file():
            problems.append(f"data.dataset: the file {d} does not exist")
        split = [] if d.lower().endswith(".json") else changed_keys(recipe.data, keys=("split",), prefix="data.")
        if split:
            problems.append(f"{', '.join(split)}: only a COCO annotations file (.json) is cut by data.split; {d} "
                            "brings its own splits (detection.synthetic sizes the generated set): "
                            f"remove {it_or_them(split)}")
        synthetic = [] if d == SYNTHETIC else changed_keys(recipe.detection.synthetic, prefix="detection.synthetic.")
        if synthetic:
            problems.append(f"{', '.join(synthetic)}: only the generated set (data.dataset: {SYNTHETIC}) is sized "
                            f"and seeded by detection.synthetic; {d} brings its own images: "
                            f"remove {it_or_them(synthetic)}")
        problems += _student_problems(recipe.student.model)
        problems += _class_problems(recipe)
        problems += _kd_problems(recipe)
        if recipe.prune.enabled and recipe.prune.method != "channels":
            problems.append(f"prune.method: '{recipe.prune.method}' prunes a transformer encoder; a detector is "
                            "pruned with 'channels'")
        by_why: dict[str, list[str]] = {}
        for i, c in enumerate(recipe.quantize.candidates):
            for key, unread in _TRANSFORMER_CANDIDATE_KEYS.items():
                value = getattr(c, key)
                if value is not None and not (key == "fuse" and value == "none"):
                    by_why.setdefault(UNREAD_KEYS[unread], []).append(f"quantize.candidates[{i}].{key}")
        problems += [f"{', '.join(keys)}: {why}: remove {it_or_them(keys)}" for why, keys in by_why.items()]
        if (recipe.export.options.get("onnx") or {}).get("optimize"):  # optimize: false, which fuses nothing, passes
            problems.append(f"export.options.onnx.optimize: {_OPTIMIZE}: remove it")
        return problems


# Why export.options.onnx.optimize is refused for a detector, as quantize.fuse is (UNREAD_KEYS).
_OPTIMIZE = ("it fuses transformer blocks (Attention, SkipLayerNorm, BiasGelu) for ONNX Runtime, which find nothing "
             "to fuse in a detector's convolutions (its graph comes out the same, save a node or two), and the "
             "file then runs on ONNX Runtime only")


# A quantize candidate's keys that only a transformer's graph reads, and the section key whose reason
# (UNREAD_KEYS) says why (fuse: none, which fuses nothing, is accepted).
_TRANSFORMER_CANDIDATE_KEYS = {"embedding_bits": "quantize.embedding_bits",
                               "embedding_float_rows": "quantize.embedding_bits",
                               "fuse": "quantize.fuse", "smooth_alpha": "quantize.smooth_alpha"}


def _student_problems(source: str | None) -> list[str]:
    """student.model must name what the distill stage builds (``DetectionTask.load_model``): a preset or a
    detector folder saved by edgekd (its classes: _class_problems)."""
    from edgekd.tasks.detection.models import PRESETS, is_detector_dir

    accepts = (f"a preset ({', '.join(PRESETS)}) or the folder of a detector saved by edgekd (config.json + "
               "model.safetensors)")
    if not source:
        return [f"student.model: a detector student is the one student.model names, and it is unset: set it to "
                f"{accepts}"]
    if source in PRESETS or is_detector_dir(Path(source)):
        return []
    return [f"student.model: '{source}' is no detector the detection stages build: set it to {accepts}"]


def _class_problems(recipe: Recipe) -> list[str]:
    """A saved detector given as teacher.model or student.model must detect the dataset's classes (the stage
    that loads it refuses it too, but the student is loaded only after the teacher stage has run)."""
    import json

    from edgekd.tasks.detection.data import class_names
    from edgekd.tasks.detection.models import CONFIG_FILE, is_detector_dir

    names = class_names(recipe.data.dataset)
    problems = []
    for key, source in (("teacher.model", recipe.teacher.model), ("student.model", recipe.student.model)):
        if names is None or not source or not is_detector_dir(Path(source)):
            continue
        n = json.loads((Path(source) / CONFIG_FILE).read_text())["config"].get("num_classes")
        if n != len(names):
            problems.append(f"{key}: {source} detects {n} classes, the dataset has {len(names)} "
                            f"({', '.join(names)}): use a detector trained on this dataset, or a preset name to "
                            "train one")
    return problems


def _kd_problems(recipe: Recipe) -> list[str]:
    """detection.feature_method and distill.temperature set where no KD term reads them (DetectionKD: the
    temperature softens the class-score and box terms, and cwd feature imitation)."""
    det, problems = recipe.detection, []
    if not det.feature_weight and changed_keys(det, keys=("feature_method",)):
        problems.append("detection.feature_method: chooses how the neck features are imitated, and "
                        "detection.feature_weight is 0 (no feature imitation): give feature_weight a weight, or "
                        "remove it")
    cwd = bool(det.feature_weight) and det.feature_method == "cwd"
    if not det.cls_weight and not det.box_weight and not cwd and changed_keys(recipe.distill, keys=("temperature",)):
        feature = "feature_weight is 0" if not det.feature_weight else f"feature_method is {det.feature_method}"
        problems.append("distill.temperature: softens the class-score and box KD terms (and cwd feature "
                        f"imitation), and none is on (detection.cls_weight and box_weight are 0, {feature}): give "
                        "cls_weight or box_weight a weight, or remove it")
    return problems


FAMILY = Detection()
