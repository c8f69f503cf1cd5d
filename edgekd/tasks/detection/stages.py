"""The pipeline's stages for object detection: the same names, run folder, manifest records and
fingerprints as the text stages.

teacher   train the teacher detector on the training split (a preset name is trained from scratch;
          a saved detector folder is used as it is)
distill   train the student with its own detection loss plus KD from the teacher: class scores per
          location (temperature-scaled), box distributions, and neck features through learned
          projectors (channel-wise or masked generative distillation)
baseline  the same student, same seed and schedule, without the teacher
eval      COCO mAP@0.5:0.95 and mAP@0.5 (pycocotools) of teacher, student and baseline on the test split
prune     channel pruning with torch-pruning's dependency graph (the head's output convs keep their
          widths), then KD recovery from the teacher
export, quantize and bench are the shared stages of edgekd.stages, fed by the task and the context.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
import torch

from edgekd.errors import RecipeError, StageError
from edgekd.progress import progress_bar
from edgekd.recipe import TrainConfig, finetune_unread
from edgekd.runfolder import fingerprint, local_model_digest
from edgekd.stages.base import load_stage_model
from edgekd.stages.prune_common import (
    LATENCY_EXAMPLES,
    prune_settings,
    recovery_train_config,
    say_search,
    search_timing_settings,
    shipped_latency_fn,
)
from edgekd.train import init_process_state, resolve_precision, to_torch, train


def _autocast(precision: str):
    mixed = resolve_precision(precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def predict_detector(model, split, batch_size: int, description: str) -> dict[str, np.ndarray]:
    """Raw outputs (boxes [N,A,4], scores [N,A,C]) of ``model`` over every image of ``split``, in order."""
    from edgekd.tasks.detection.models import DetectionExport

    module = DetectionExport(model.eval())
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {"boxes": [], "scores": []}
    with progress_bar(description, total=len(split)) as bar:
        for idx in split.eval_batches(batch_size):
            boxes, scores = module(torch.from_numpy(split.collate(idx)["images"]).to(device))
            parts["boxes"].append(boxes.float().cpu().numpy())
            parts["scores"].append(scores.float().cpu().numpy())
            bar.advance(len(idx))
    return {k: np.concatenate(v) for k, v in parts.items()}


def validation_metrics(ctx, model, split: str = "validation") -> dict[str, float]:
    data = ctx.split(split)
    out = predict_detector(model, data, ctx.recipe.eval.batch_size, f"{split} mAP")
    return ctx.task.metrics(out, data.ground_truth())


def _core(m):
    """The detector inside a data-parallel wrapper (the loss reads its anchors and reg_max)."""
    return getattr(m, "module", m)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# teacher


def teacher_fingerprint(ctx) -> str:
    r = ctx.recipe
    settings = {"teacher": r.teacher.model, "train": r.teacher.finetune.model_dump(mode="json"),
                "data": ctx.data_fingerprint, "seed": r.seed, "precision": r.runtime.precision, "task": "detection"}
    files = local_model_digest(r.teacher.model)
    if files:  # a saved detector folder: its files, so one retrained or replaced in place is read again
        settings["model_files"] = files
    return fingerprint(settings)


def _check_local_teacher(ctx) -> None:
    if ctx.recipe.teacher.kind != "model" or ctx.recipe.teacher.ensemble:
        raise StageError("detection distils from a local teacher detector (teacher.kind: model, no ensemble); "
                         "black-box and multi-teacher distillation are for text classification.")


def run_teacher(ctx) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from edgekd.tasks.detection.loss import DetectionLoss

    _check_local_teacher(ctx)
    r, task = ctx.recipe, ctx.task
    fp = teacher_fingerprint(ctx)
    t0 = time.perf_counter()
    set_seed(r.seed)
    model = task.load_model(r.teacher.model)
    trained = not task.has_task_head(r.teacher.model)
    unread = [] if trained else finetune_unread(r.teacher)
    if unread:
        raise RecipeError(unread)
    history: list[dict[str, float]] = []
    seconds = 0.0
    if trained:
        ctx.say(f"[bold]teacher[/]: training {r.teacher.model} ({_params(model) / 1e6:.2f}M params) from scratch")
        criterion = DetectionLoss()

        def loss_fn(m, batch):
            return criterion(m(batch["images"]), _core(m), batch)

        ckpt = ctx.checkpoint_dir("teacher", fp)
        res = train(model, ctx.split("train"), r.teacher.finetune, loss_fn, seed=r.seed,
                    precision=r.runtime.precision, ckpt_root=ckpt, description="teacher training")
        history, seconds = res.history, res.seconds
        shutil.rmtree(ckpt, ignore_errors=True)
    metrics = {"finetuned": trained, "train_history": history, "train_seconds": round(seconds, 2),
               "params": _params(model), "validation": validation_metrics(ctx, model)}
    if ctx.is_main:  # only the main process writes to the run folder under `accelerate launch`
        task.save_model(model, ctx.model_dir("teacher"))
        ctx.run.record("teacher", fp, metrics, [ctx.model_dir("teacher")], seconds=time.perf_counter() - t0,
                       extra={"source": r.teacher.model})
    ctx.sync()
    return metrics


# ---------------------------------------------------------------------------------------------
# distill / baseline


def student_fingerprint(ctx, stage: str) -> str:
    """The distilled student's settings with its teacher's fingerprint; the baseline's with the data's
    alone (it starts from a fresh preset or student.model, never from the teacher, and trains without it).
    The KD keys are the recipe's even where no term reads them: check_inputs refuses them away from their
    defaults there, so they stay at those."""
    r = ctx.recipe
    settings: dict[str, Any] = {"student": r.student.model, "train": r.distill.train.model_dump(mode="json")}
    files = local_model_digest(r.student.model)
    if files:  # a saved detector folder, not a preset: its files
        settings["student_files"] = files
    if stage == "distill":
        settings["kd"] = {"temperature": r.distill.temperature,
                          **r.detection.model_dump(mode="json", include={"cls_weight", "box_weight",
                                                                         "feature_weight", "feature_method"})}
        settings["teacher"] = teacher_fingerprint(ctx)
    else:
        settings["data"] = ctx.data_fingerprint
    return fingerprint({**settings, "seed": r.seed, "precision": r.runtime.precision, "stage": stage})


def _kd_module(ctx, student, teacher):
    from edgekd.tasks.detection.loss import DetectionKD

    det = ctx.recipe.detection
    return DetectionKD(student.feat_channels, teacher.feat_channels, cls_weight=det.cls_weight,
                       box_weight=det.box_weight, feature_weight=det.feature_weight,
                       temperature=ctx.recipe.distill.temperature, feature_method=det.feature_method)


def train_student(ctx, student, teacher, cfg: TrainConfig, ckpt, description: str, seed: int) -> Any:
    """Train ``student`` in place: detection loss, plus KD from ``teacher`` when one is given."""
    from edgekd.tasks.detection.loss import DetectionLoss

    r = ctx.recipe
    criterion = DetectionLoss()
    kd = _kd_module(ctx, student, teacher) if teacher is not None else None
    if teacher is not None:
        # The teacher (loaded on the CPU) and the KD projectors run beside the student, which the
        # accelerator moves to its device; the projectors before the optimizer is built over them.
        device = init_process_state().device
        teacher.to(device).eval().requires_grad_(False)
        kd.to(device)

    def loss_fn(m, batch):
        out = m(batch["images"])
        loss, logs = criterion(out, _core(m), batch)
        if kd is not None:
            with torch.no_grad(), _autocast(r.runtime.precision):
                t_out = teacher(batch["images"])
            kd_loss, kd_logs = kd(out, t_out)
            loss = loss + kd_loss
            logs = {**logs, **kd_logs}
        return loss, logs

    extra = list(kd.parameters()) if kd is not None else None
    return train(student, ctx.split("train"), cfg, loss_fn, seed=seed, precision=r.runtime.precision,
                 ckpt_root=ckpt, description=description, extra_params=extra or None)


def run_student_stage(ctx, stage: str) -> dict[str, Any]:
    from accelerate.utils import set_seed

    r, task = ctx.recipe, ctx.task
    if not r.student.model:
        raise StageError("detection needs student.model: a preset (edgekd-det-s) or a saved detector folder.")
    fp = student_fingerprint(ctx, stage)
    t0 = time.perf_counter()
    teacher = load_stage_model(ctx, "teacher") if stage == "distill" else None
    set_seed(r.seed)  # the distilled and the baseline student start from the same weights
    student = task.load_model(r.student.model)
    ckpt = ctx.checkpoint_dir(stage, fp)
    res = train_student(ctx, student, teacher, r.distill.train, ckpt,
                        "distill" if teacher is not None else "baseline (no teacher)", r.seed)
    shutil.rmtree(ckpt, ignore_errors=True)
    metrics = {"train_history": res.history, "train_seconds": round(res.seconds, 2),
               "resumed_from_epoch": res.resumed_from_epoch, "params": _params(student),
               "train_examples": len(ctx.split("train")), "validation": validation_metrics(ctx, student)}
    if ctx.is_main:
        task.save_model(student, ctx.model_dir(stage))
        ctx.run.record(stage, fp, metrics, [ctx.model_dir(stage)], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics


# ---------------------------------------------------------------------------------------------
# eval


def eval_fingerprint(ctx) -> str:
    parts = {"teacher": teacher_fingerprint(ctx), "distill": student_fingerprint(ctx, "distill")}
    if ctx.recipe.baseline.enabled:
        parts["baseline"] = student_fingerprint(ctx, "baseline")
    return fingerprint(parts)


def run_eval(ctx) -> dict[str, Any]:
    r = ctx.recipe
    t0 = time.perf_counter()
    models = {"teacher": load_stage_model(ctx, "teacher"), "student": load_stage_model(ctx, "distill")}
    if r.baseline.enabled:
        models["baseline"] = load_stage_model(ctx, "baseline")
    results: dict[str, Any] = {}
    for name, model in models.items():
        m = validation_metrics(ctx, model, "test")
        m["params"] = _params(model)
        m["size_bytes"] = (ctx.model_dir(name if name != "student" else "distill") / "model.safetensors").stat().st_size
        results[name] = m
    t, s = results["teacher"]["map50_95"], results["student"]["map50_95"]
    summary = {"test_images": len(ctx.split("test")),
               "student_keeps_teacher_map": s / t if t else None,
               "student_params_ratio": results["student"]["params"] / results["teacher"]["params"]}
    if "baseline" in results:
        summary["distill_gain_over_baseline_map50_95"] = s - results["baseline"]["map50_95"]
        summary["distill_gain_over_baseline_map50"] = results["student"]["map50"] - results["baseline"]["map50"]
    metrics = {**results, "summary": summary}
    if ctx.is_main:
        ctx.run.record("eval", eval_fingerprint(ctx), metrics, seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics


# ---------------------------------------------------------------------------------------------
# prune


def prune_fingerprint(ctx) -> str:
    r = ctx.recipe
    return fingerprint({"prune": prune_settings(r.prune), "distill": student_fingerprint(ctx, "distill"),
                        "seed": r.seed, **search_timing_settings(r)})


def head_output_convs(model) -> list:
    """The convs whose output width is the task's (class logits, box distribution bins)."""
    from torch import nn

    return [branch[-1] for branch in (*model.head.cls, *model.head.box) if isinstance(branch[-1], nn.Conv2d)]


def run_prune(ctx) -> dict[str, Any]:
    from edgekd.pruning import PruneContext, prune_model
    from edgekd.tasks.detection.loss import DetectionLoss

    r, task, cfg = ctx.recipe, ctx.task, ctx.recipe.prune
    if cfg.method != "channels":
        raise StageError(f"prune.method '{cfg.method}' is for transformers; detectors are pruned with "
                         "prune.method: channels.")
    t0 = time.perf_counter()
    fp = prune_fingerprint(ctx)
    model = load_stage_model(ctx, "distill")
    teacher = load_stage_model(ctx, "teacher")
    train_split = ctx.split("train")
    batches = [to_torch(train_split.collate(idx))
               for idx in train_split.train_batches(r.distill.train.batch_size, seed=r.seed)[: cfg.score_batches]]
    criterion = DetectionLoss()

    def loss_fn(m, batch):
        return criterion(m(batch["images"]), _core(m), batch)[0]

    def recover_for(epochs: float, step: int, label: str):
        def run(m):
            tc = recovery_train_config(r, epochs)
            ckpt = ctx.checkpoint_dir("prune", f"{fp}-{label}")
            train_student(ctx, m, teacher, tc, ckpt, f"prune: recover {label}", r.seed + step)
            shutil.rmtree(ckpt, ignore_errors=True)
            return m.eval()
        return run

    def recover(m, step: int):
        return recover_for(cfg.recover_epochs, step, f"step{step}")(m)

    latency_fn = None
    if cfg.target_latency_ms is not None or cfg.max_accuracy_drop is not None:
        # Timed on validation images (the search selects on it; test stays for the report).
        val = ctx.split("validation")
        images = val.collate(np.arange(min(len(val), LATENCY_EXAMPLES)))["images"]
        latency_fn = shipped_latency_fn(ctx, {"images": images})
    size = r.detection.image_size
    pctx = PruneContext(score_batches=batches, evaluate=lambda m: validation_metrics(ctx, m),
                        recover=recover if cfg.recover_epochs > 0 else None, loss_fn=loss_fn,
                        example_inputs=torch.zeros(1, 3, size, size), ignored_layers=head_output_convs(model),
                        latency_fn=latency_fn, recover_final=recover_for(cfg.final_recover_epochs, 1000, "final"),
                        metric=task.primary_metric)
    model, metrics = prune_model(model.train(), cfg, pctx)
    say_search(ctx, cfg, metrics)
    metrics["feat_channels"] = model.feat_channels
    if ctx.is_main:
        task.save_model(model.eval(), ctx.model_dir("prune"))
        ctx.run.record("prune", fp, metrics, [ctx.model_dir("prune")], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics
