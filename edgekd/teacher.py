"""The teacher stage: fine-tune the teacher when it has no task head, then cache its outputs.

The teacher's logits on the training split are computed once here and stored in the run folder,
so distillation never runs the teacher again for them (DESIGN: teacher outputs cached).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
from transformers import set_seed

from edgekd.context import RunContext
from edgekd.losses import soft_hard_loss
from edgekd.runfolder import atomic_write_bytes, fingerprint
from edgekd.train import predict, train

STAGE = "teacher"
LOGITS = "train_logits.npy"


def teacher_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    return fingerprint({
        "teacher": r.teacher.model_dump(mode="json"),
        "data": ctx.data_fingerprint,
        "seed": r.seed,
        "precision": r.runtime.precision,
    })


def _save_npy(path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def run_teacher(ctx: RunContext) -> dict[str, Any]:
    r, task = ctx.recipe, ctx.task
    fp = teacher_fingerprint(ctx)
    t0 = time.perf_counter()
    set_seed(r.seed)  # a fresh task head is initialised randomly: seed it like the rest of the run
    model = task.load_model(r.teacher.model)
    finetuned = not task.has_task_head(r.teacher.model)
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
    out_dir = ctx.model_dir(STAGE)
    if ctx.is_main:
        task.save_model(model, ctx.tokenizer, out_dir)

    # Soft targets for the whole training split, once.
    c0 = time.perf_counter()
    train_logits = predict(model, ctx.tokenized("train"), r.eval.batch_size, "teacher outputs (cache)",
                           precision=r.runtime.precision)
    cache_seconds = time.perf_counter() - c0
    logits_path = ctx.run.stage_dir(STAGE) / LOGITS
    if ctx.is_main:
        _save_npy(logits_path, train_logits)
    val_logits = predict(model, ctx.tokenized("validation"), r.eval.batch_size, "teacher validation")
    val = task.metrics({"logits": val_logits}, ctx.tokenized("validation").labels)
    if finetuned:
        shutil.rmtree(ctx.checkpoint_dir(STAGE, fp), ignore_errors=True)
    metrics = {
        "finetuned": finetuned,
        "validation": val,
        "train_history": history,
        "train_seconds": round(train_seconds, 2),
        "cache_seconds": round(cache_seconds, 2),
        "cached_examples": int(len(train_logits)),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if ctx.is_main:
        ctx.run.record(STAGE, fp, metrics, [out_dir, logits_path], seconds=time.perf_counter() - t0,
                       extra={"source": r.teacher.model})
    ctx.sync()
    return metrics


def load_teacher_outputs(ctx: RunContext) -> tuple[Any, np.ndarray]:
    """The fine-tuned teacher and its cached training-split logits, from the run folder."""
    from edgekd.errors import StageError

    fp = teacher_fingerprint(ctx)
    if not ctx.run.is_done(STAGE, fp):
        raise StageError(
            f"The teacher stage of run '{ctx.recipe.name}' is missing or out of date with the recipe. "
            "Run `edgekd teacher` (or `edgekd run`) first."
        )
    model = ctx.task.load_model(ctx.model_dir(STAGE))
    logits = np.load(ctx.run.stage_dir(STAGE) / LOGITS)
    return model.eval(), logits
