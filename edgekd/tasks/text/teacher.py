"""The teacher stage: fine-tune the teacher when it has no task head, then cache its outputs.

The teacher's logits on the training split are computed once here and stored in the run folder,
so distillation never runs the teacher again for them (DESIGN: teacher outputs cached). Black-box
teachers, ensembles and extra unlabelled texts produce the same file (see edgekd.teachers.stage).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
from transformers import set_seed

from edgekd.context import RunContext
from edgekd.errors import RecipeError
from edgekd.losses import soft_hard_loss
from edgekd.recipe import finetune_unread
from edgekd.runfolder import atomic_write_bytes, fingerprint, local_model_digest
from edgekd.train import predict, train

STAGE = "teacher"
LOGITS = "train_logits.npy"


def teacher_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    t = r.teacher
    # Only settings that change the targets count (not the client's retries or rate); keys at their
    # defaults are left out, so runs recorded before those keys existed stay valid.
    settings = {**t.model_dump(mode="json", exclude_defaults=True, exclude={"client"}),
                "model": t.model, "finetune": t.finetune.model_dump(mode="json")}
    if not t.is_plain():
        from edgekd.teachers.stage import input_digests

        settings["inputs"] = input_digests(t)
    files = local_model_digest(t.model)
    if files:  # a local folder: its files, so one retrained or replaced in place is read again
        settings["model_files"] = files
    from edgekd.tasks.text.task import head_reordered

    if any(m.kind == "model" and head_reordered(m.model, lambda: ctx.task.label_names) for m in t.members()):
        settings["head_order"] = "by-name"  # rows put in the run's label order (they were used as they were)
    return fingerprint({
        "teacher": settings,
        "data": ctx.data_fingerprint,
        "seed": r.seed,
        "precision": r.runtime.precision,
    })


def _save_npy(path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _fit_local_teacher(ctx: RunContext, fp: str) -> tuple[Any, dict[str, Any]]:
    """Load the local teacher, fine-tune it when it has no task head, save it to teacher/model."""
    r, task = ctx.recipe, ctx.task
    set_seed(r.seed)  # a fresh task head is initialised randomly: seed it like the rest of the run
    model = task.load_model(r.teacher.model, where="teacher.model")
    finetuned = not task.has_task_head(r.teacher.model)
    unread = [] if finetuned else finetune_unread(r.teacher)
    if unread:
        raise RecipeError(unread)
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    if finetuned:
        ctx.say(f"[bold]teacher[/]: {r.teacher.model} has no {task.name} head: fine-tuning it first")

        def loss_fn(m, batch):
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return soft_hard_loss(out.logits, None, batch["labels"], 0.0, 1.0)

        ckpt = ctx.checkpoint_dir(STAGE, fp)
        res = train(model, ctx.tokenized("train"), r.teacher.finetune, loss_fn, seed=r.seed,
                    precision=r.runtime.precision, ckpt_root=ckpt, description="teacher fine-tune")
        history, train_seconds = res.history, res.seconds
    if ctx.is_main:
        task.save_model(model, ctx.tokenizer, ctx.model_dir(STAGE))
    return model, {"finetuned": finetuned, "train_history": history, "train_seconds": round(train_seconds, 2),
                   "params": sum(p.numel() for p in model.parameters())}


def run_teacher(ctx: RunContext) -> dict[str, Any]:
    r, task = ctx.recipe, ctx.task
    fp = teacher_fingerprint(ctx)
    t0 = time.perf_counter()
    model, fit, targets, artifacts = None, {}, {}, []
    if r.teacher.kind == "model":
        model, fit = _fit_local_teacher(ctx, fp)
        artifacts.append(ctx.model_dir(STAGE))
    if r.teacher.is_plain():
        # Soft targets for the whole training split, once.
        c0 = time.perf_counter()
        train_logits = predict(model, ctx.tokenized("train"), r.eval.batch_size, "teacher outputs (cache)",
                               precision=r.runtime.precision)
        cache_seconds = time.perf_counter() - c0
        logits_path = ctx.run.stage_dir(STAGE) / LOGITS
        if ctx.is_main:
            _save_npy(logits_path, train_logits)
        artifacts.append(logits_path)
        val_logits = predict(model, ctx.tokenized("validation"), r.eval.batch_size, "teacher validation")
        targets = {"validation": task.metrics({"logits": val_logits}, ctx.tokenized("validation").labels),
                   "cache_seconds": round(cache_seconds, 2), "cached_examples": int(len(train_logits))}
    elif ctx.is_main:
        # Black boxes, ensembles, unlabelled texts: asked once, by the main process only.
        from edgekd.teachers.stage import label_with_teachers

        c0 = time.perf_counter()
        targets, files = label_with_teachers(ctx, model)
        targets["cache_seconds"] = round(time.perf_counter() - c0, 2)
        artifacts += files
    if fit.get("finetuned"):
        shutil.rmtree(ctx.checkpoint_dir(STAGE, fp), ignore_errors=True)
    metrics = {"finetuned": False, "train_history": [], "train_seconds": 0.0, **fit, **targets}
    if ctx.is_main:
        ctx.run.record(STAGE, fp, metrics, artifacts, seconds=time.perf_counter() - t0,
                       extra={"source": r.teacher.model if r.teacher.kind == "model" else
                              (r.teacher.url or r.teacher.path)})
    ctx.sync()
    return metrics


def load_teacher_outputs(ctx: RunContext) -> tuple[Any, np.ndarray]:
    """The fine-tuned teacher (None for a black-box teacher) and its cached training-split logits
    (for ensembles and unlabelled texts, the combined targets: the training split's rows first,
    then one per unlabelled text; see edgekd.teachers.stage)."""
    from edgekd.errors import StageError

    fp = teacher_fingerprint(ctx)
    why = ctx.run.stale_reason(STAGE, fp)
    if why:
        raise StageError(f"The teacher stage of run '{ctx.recipe.name}' is missing or out of date ({why}). "
                         "Run `edgekd teacher` (or `edgekd run`) first.")
    model = ctx.task.load_model(ctx.model_dir(STAGE)).eval() if ctx.recipe.teacher.kind == "model" else None
    logits = np.load(ctx.run.stage_dir(STAGE) / LOGITS)
    return model, logits
