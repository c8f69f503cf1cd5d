"""The distill stage (and its hard-label baseline): teach a smaller student from the teacher.

Loss = α·T²·KL(teacher ‖ student at T) + (1−α)·CE(labels)
       + hidden_weight · hidden-state loss (learned projection when widths differ)
       + attention_weight · attention-map loss.
Soft targets come from the teacher's cached logits; the teacher itself runs only when
hidden-state or attention matching needs its intermediate states.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch
from torch import nn

from edgekd.context import RunContext
from edgekd.errors import RecipeError
from edgekd.losses import attention_loss, hidden_state_loss, soft_hard_loss
from edgekd.runfolder import fingerprint
from edgekd.teacher import load_teacher_outputs, teacher_fingerprint
from edgekd.train import predict, train


def student_layers(ctx: RunContext, teacher: nn.Module) -> list[int]:
    layers = ctx.recipe.student.layers
    return list(layers) if layers else ctx.task.default_layers(teacher.config.num_hidden_layers)


def layer_map(n_student: int, n_teacher: int, layers: list[int] | None) -> list[int]:
    """Teacher layer matched by each student layer: the layer it was copied from, else spread evenly."""
    if layers:
        return list(layers)
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def stage_fingerprint(ctx: RunContext, stage: str) -> str:
    r = ctx.recipe
    settings = {"student": r.student.model_dump(mode="json"), "train": r.distill.train.model_dump(mode="json")}
    if stage == "distill":
        settings["distill"] = r.distill.model_dump(mode="json")
    return fingerprint({**settings, "teacher": teacher_fingerprint(ctx), "seed": r.seed,
                        "precision": r.runtime.precision, "stage": stage})


def build_student(ctx: RunContext, teacher: nn.Module) -> tuple[nn.Module, list[int] | None]:
    r = ctx.recipe
    if r.student.model:
        return ctx.task.load_model(r.student.model), None
    layers = student_layers(ctx, teacher)
    return ctx.task.build_student(teacher, layers), layers


def _use_eager_attention(model: nn.Module) -> None:
    """SDPA kernels do not return attention maps; attention matching needs the eager path."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def run_student_stage(ctx: RunContext, stage: str) -> dict[str, Any]:
    """``stage`` is 'distill' (soft targets + optional matching) or 'baseline' (hard labels only)."""
    r, task = ctx.recipe, ctx.task
    d = r.distill
    fp = stage_fingerprint(ctx, stage)
    t0 = time.perf_counter()
    teacher, cached_logits = load_teacher_outputs(ctx)
    student, copied = build_student(ctx, teacher)
    student_tok = ctx.tokenizer if not r.student.model else task.load_tokenizer(r.student.model)
    train_data = ctx.tokenized("train", student_tok)
    same_tokens = student_tok.get_vocab() == ctx.tokenizer.get_vocab()

    distilling = stage == "distill"
    use_hidden = distilling and d.hidden_weight > 0
    use_att = distilling and d.attention_weight > 0
    if (use_hidden or use_att) and not same_tokens:
        raise RecipeError([
            "distill.hidden_weight / distill.attention_weight: hidden-state and attention matching need the "
            "student to share the teacher's tokenizer; set them to 0 or use a student with the same vocabulary"
        ])
    mapping = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers, copied)
    projections = nn.ModuleList()
    if use_hidden and student.config.hidden_size != teacher.config.hidden_size:
        projections = nn.ModuleList(
            nn.Linear(student.config.hidden_size, teacher.config.hidden_size) for _ in mapping
        )
    if use_att:
        _use_eager_attention(student)
        _use_eager_attention(teacher)
    teacher_logits = torch.from_numpy(cached_logits)
    teacher_dev = None

    def loss_fn(m, batch):
        nonlocal teacher_dev
        want_states = use_hidden or use_att
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=use_hidden, output_attentions=use_att)
        t_logits = teacher_logits[batch["index"].cpu()].to(out.logits.device) if distilling else None
        loss, logs = soft_hard_loss(out.logits, t_logits, batch["labels"], d.alpha if distilling else 0.0,
                                    d.temperature, d.kl)
        if want_states:
            if teacher_dev is None:
                teacher_dev = teacher.to(out.logits.device)
            with torch.no_grad():
                t_out = teacher_dev(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_hidden_states=use_hidden, output_attentions=use_att)
            mask = batch["attention_mask"]
            if use_hidden:
                hl = 0.0
                for i, tl in enumerate(mapping):
                    s_h = out.hidden_states[i + 1]
                    if len(projections):
                        s_h = projections[i].to(s_h.device)(s_h)
                    hl = hl + hidden_state_loss(s_h, t_out.hidden_states[tl + 1], mask, d.hidden_loss)
                hl = hl / len(mapping)
                loss = loss + d.hidden_weight * hl
                logs["hidden"] = float(hl.detach())
            if use_att:
                al = sum(attention_loss(out.attentions[i], t_out.attentions[tl], mask)
                         for i, tl in enumerate(mapping)) / len(mapping)
                loss = loss + d.attention_weight * al
                logs["attention"] = float(al.detach())
        return loss, logs

    label = "distill" if distilling else "baseline (hard labels)"
    ctx.say(f"[bold]{stage}[/]: {student.config.num_hidden_layers}-layer student"
            + (f" from teacher layers {copied}" if copied else f" from {r.student.model}"))
    res = train(student, train_data, d.train, loss_fn, seed=r.seed, precision=r.runtime.precision,
                ckpt_root=ctx.checkpoint_dir(stage, fp), description=label,
                extra_params=list(projections.parameters()) or None)
    if use_att:
        # Export and serving use the fast attention kernels again.
        if hasattr(student, "set_attn_implementation"):
            student.set_attn_implementation("sdpa")
    out_dir = ctx.model_dir(stage)
    if ctx.is_main:
        task.save_model(student, student_tok, out_dir)
    val_data = ctx.tokenized("validation", student_tok)
    val_logits = predict(student, val_data, r.eval.batch_size, f"{stage} validation")
    metrics = {
        "validation": task.metrics({"logits": val_logits}, val_data.labels),
        "layers_from_teacher": copied,
        "layer_map": mapping,
        "train_history": res.history,
        "train_seconds": round(res.seconds, 2),
        "resumed_from_epoch": res.resumed_from_epoch,
        "params": sum(p.numel() for p in student.parameters()),
        "teacher_forward_per_step": bool(use_hidden or use_att),
    }
    if ctx.is_main:
        shutil.rmtree(ctx.checkpoint_dir(stage, fp), ignore_errors=True)
        ctx.run.record(stage, fp, metrics, [out_dir], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics


def load_student(ctx: RunContext, stage: str = "distill"):
    from edgekd.errors import StageError

    if not ctx.run.is_done(stage, stage_fingerprint(ctx, stage)):
        raise StageError(
            f"The {stage} stage of run '{ctx.recipe.name}' is missing or out of date with the recipe. "
            f"Run `edgekd {stage}` (or `edgekd run`) first."
        )
    return ctx.task.load_model(ctx.model_dir(stage)).eval()
