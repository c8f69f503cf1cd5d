"""The eval stage: teacher, distilled student and hard-label baseline on the held-out test split.

Reports accuracy, macro-F1 and top-1 agreement with the teacher, how much of the teacher's
accuracy the student keeps, and the measured gain of distillation over the hard-label baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.context import RunContext
from edgekd.runfolder import fingerprint
from edgekd.stages.base import load_stage_model
from edgekd.tasks.text.distill import stage_fingerprint
from edgekd.tasks.text.teacher import teacher_fingerprint
from edgekd.train import predict


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def eval_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    parts = {"teacher": teacher_fingerprint(ctx), "distill": stage_fingerprint(ctx, "distill")}
    if r.baseline.enabled:
        parts["baseline"] = stage_fingerprint(ctx, "baseline")
    if r.eval.ood_dataset:
        # less the run's own texts since 2026-12-07 (one sentence of the default set): scored again once
        parts["ood"] = {"dataset": r.eval.ood_dataset, "min_abs_score": r.eval.ood_min_abs_score,
                        "less_run_texts": True}
    return fingerprint(parts)


def run_eval(ctx: RunContext) -> dict[str, Any]:
    r, task = ctx.recipe, ctx.task
    t0 = time.perf_counter()
    from edgekd.tasks.text.teacher import load_teacher_outputs
    from edgekd.teachers.stage import cached_split_logits

    teacher, _ = load_teacher_outputs(ctx)
    test = ctx.tokenized("test")
    logits: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    models = {"teacher": (teacher, ctx.model_dir("teacher"))}
    teacher_test = cached_split_logits(ctx, "test")
    if teacher_test is not None:
        # A black-box or combined teacher is scored from its answers on the test split, cached by its stage.
        logits["teacher"] = teacher_test
        results["teacher"] = {**task.metrics({"logits": teacher_test}, test.labels), "agreement_with_teacher": 1.0,
                              "params": None, "size_bytes": None, "layers": None}
        models = {}
    models["student"] = (load_stage_model(ctx, "distill"), ctx.model_dir("distill"))
    if r.baseline.enabled:
        models["baseline"] = (load_stage_model(ctx, "baseline"), ctx.model_dir("baseline"))
    from edgekd.ood import ood_split

    ood = ood_split(ctx)
    if ood is not None and "teacher" not in models:
        results["teacher"]["ood_accuracy"] = None  # a black-box teacher answered the test split only
    for name, (model, folder) in models.items():
        logits[name] = predict(model, test, r.eval.batch_size, f"eval {name} (test)")
        m = task.metrics({"logits": logits[name]}, test.labels)
        m["agreement_with_teacher"] = float((logits[name].argmax(-1) == logits["teacher"].argmax(-1)).mean())
        m["params"] = sum(p.numel() for p in model.parameters())
        m["size_bytes"] = _size_bytes(folder)
        m["layers"] = model.config.num_hidden_layers
        if ood is not None:
            ood_logits = predict(model, ood[1], r.eval.batch_size, f"eval {name} ({ood[0].name})")
            m["ood_accuracy"] = task.metrics({"logits": ood_logits}, ood[1].labels)["accuracy"]
        results[name] = m
    t_acc, s_acc = results["teacher"]["accuracy"], results["student"]["accuracy"]
    summary = {
        "test_examples": len(test),
        "student_keeps_teacher_accuracy": s_acc / t_acc if t_acc else None,
        "student_params_ratio": (results["student"]["params"] / results["teacher"]["params"]
                                 if results["teacher"]["params"] else None),
    }
    if ood is not None:
        summary["ood"] = ood[0].record()
        s_ood = results["student"]["ood_accuracy"]
        t_ood = results["teacher"].get("ood_accuracy")
        summary["student_keeps_teacher_ood_accuracy"] = s_ood / t_ood if t_ood else None
    if "baseline" in results:
        summary["distill_gain_over_baseline"] = s_acc - results["baseline"]["accuracy"]
        # What each trained on: distillation also on the texts the teacher labelled (teacher.augment copies,
        # teacher.unlabelled), the baseline on the labelled training split alone; the summary says so.
        for stage in ("distill", "baseline"):
            n = ((ctx.run.stage_record(stage) or {}).get("metrics") or {}).get("train_examples")
            if n is not None:
                summary[f"{stage}_train_examples"] = n
    metrics = {**results, "summary": summary}
    if ctx.is_main:
        ctx.run.record("eval", eval_fingerprint(ctx), metrics, seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics
