"""The distill stage (and its hard-label baseline): teach a smaller student from the teacher.

Loss = α·T²·KL(teacher ‖ student at T) + (1−α)·CE(labels)
       + hidden_weight · hidden-state loss (learned projection when widths differ)
       + attention_weight · attention-map loss.
Soft targets come from the teacher's cached logits; the teacher itself runs only when
hidden-state or attention matching needs its intermediate states. A labels-only teacher gives hard
targets: α·CE(teacher's labels) + (1−α)·CE(labels). With ``distill.rounds`` > 1 (born-again
networks, Furlanello et al. 2018) each later round trains a fresh student from the previous one.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import set_seed

from edgekd.context import RunContext
from edgekd.errors import RecipeError
from edgekd.losses import attention_loss, hidden_state_loss, soft_hard_loss, teacher_labels_loss
from edgekd.recipe import DistillConfig
from edgekd.runfolder import fingerprint, local_model_digest
from edgekd.tasks.text.checks import BLACK_BOX_MATCHING
from edgekd.tasks.text.teacher import load_teacher_outputs, teacher_fingerprint
from edgekd.train import predict, train


def student_layers(ctx: RunContext, teacher: nn.Module) -> list[int]:
    layers = ctx.recipe.student.layers
    return list(layers) if layers else ctx.task.default_layers(teacher.config.num_hidden_layers)


def layer_map(n_student: int, n_teacher: int, layers: list[int] | None) -> list[int]:
    """Teacher layer matched by each student layer: the layer it was copied from, else spread evenly."""
    if layers:
        return list(layers)
    # at least layer 0: a student deeper than its teacher would pair its first layer with index -1, which the
    # hidden-state loss reads as the embedding output and the attention loss as the last layer
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def stage_fingerprint(ctx: RunContext, stage: str) -> str:
    from edgekd.tasks.text.task import head_reordered

    r = ctx.recipe
    settings = {"student": r.student.model_dump(mode="json"), "train": r.distill.train.model_dump(mode="json")}
    files = local_model_digest(r.student.model)
    if files:  # student.model as a local folder: its files, so one replaced in place is read again
        settings["student_files"] = files
    if head_reordered(r.student.model, lambda: ctx.task.label_names):
        settings["student_head_order"] = "by-name"  # rows put in the run's label order (they were used as they were)
    if stage == "distill":
        # rounds is left out at its default, so runs recorded before it existed stay valid
        settings["distill"] = r.distill.model_dump(mode="json", exclude={"rounds"} if r.distill.rounds == 1 else None)
    return fingerprint({**settings, "teacher": teacher_fingerprint(ctx), "seed": r.seed,
                        "precision": r.runtime.precision, "stage": stage})


def build_student(ctx: RunContext, teacher: nn.Module) -> tuple[nn.Module, list[int] | None]:
    r = ctx.recipe
    if r.student.model:
        return ctx.task.load_model(r.student.model, where="student.model"), None
    layers = student_layers(ctx, teacher)
    return ctx.task.build_student(teacher, layers), layers


def _use_attention(model: nn.Module, impl: str) -> str:
    """Switch the attention implementation; return the one the model had. SDPA kernels do not return
    attention maps, so attention matching runs the eager path and then puts back what the model had
    (families without SDPA, e.g. DeBERTa-v2 or MPNet, were eager all along)."""
    before = model.config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    return before


class DistillLoss:
    """The loss of one student learning from a teacher, for ``edgekd.train.train``:

    α·T²·KL(soft targets ‖ student at T) + (1−α)·CE(labels), or with a labels-only teacher
    α·CE(teacher's labels) + (1−α)·CE(labels); plus ``hidden_weight`` × hidden-state loss of each
    student layer against the teacher layer ``mapping`` names (a learned projection when the widths
    differ) and ``attention_weight`` × attention-map loss. ``soft_logits`` / ``hard_labels`` hold one
    row per training example, found by the batch's ``index``; ``distilling=False`` trains on the
    data's labels only (the hard-label baseline). Used by the distill stage and by ``edgekd.distill``.
    """

    def __init__(self, student: nn.Module, settings: DistillConfig, *, soft_logits: torch.Tensor | None = None,
                 hard_labels: torch.Tensor | None = None, teacher: nn.Module | None = None,
                 mapping: list[int] | None = None, distilling: bool = True, seed: int | None = None):
        d = self.settings = settings
        self.soft_logits, self.hard_labels, self.teacher = soft_logits, hard_labels, teacher
        self.distilling = distilling
        self.use_hidden = distilling and d.hidden_weight > 0
        self.use_att = distilling and d.attention_weight > 0
        if (self.use_hidden or self.use_att) and teacher is None:
            raise RecipeError([BLACK_BOX_MATCHING])
        if distilling and soft_logits is None and hard_labels is None:
            raise ValueError("distilling needs the teacher's soft_logits or hard_labels, one row per training example")
        self.mapping = list(mapping or [])
        self.projections = nn.ModuleList()
        if self.use_hidden and student.config.hidden_size != teacher.config.hidden_size:
            # Initialised from ``seed`` alone, not from whatever the process drew before (a whole `edgekd run`
            # and `edgekd distill` on its own start them alike), leaving the global generator as it was.
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                self.projections = nn.ModuleList(
                    nn.Linear(student.config.hidden_size, teacher.config.hidden_size) for _ in self.mapping
                )
        self._teacher_dev: nn.Module | None = None

    def extra_params(self) -> list[nn.Parameter] | None:
        """Parameters trained alongside the student (the hidden-state projections), if any."""
        return list(self.projections.parameters()) or None

    @contextmanager
    def attention_maps(self, student: nn.Module):
        """Eager attention on student and teacher while attention maps are matched; the models get
        their own kernels back afterwards (export and serving use them)."""
        before = {}
        if self.use_att:
            before = {id(m): (m, _use_attention(m, "eager")) for m in (student, self.teacher)}
        try:
            yield
        finally:
            for m, impl in before.values():
                _use_attention(m, impl)

    def __call__(self, m: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.settings
        use_hidden, use_att = self.use_hidden, self.use_att
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=use_hidden, output_attentions=use_att)
        idx = batch["index"].cpu()
        if self.distilling and self.hard_labels is not None:
            # A labels-only teacher: alpha weights cross-entropy on its labels, 1-alpha on the data's.
            loss, logs = teacher_labels_loss(out.logits, self.hard_labels[idx].to(out.logits.device),
                                             batch["labels"], d.alpha)
        else:
            t_logits = self.soft_logits[idx].to(out.logits.device) if self.distilling else None
            loss, logs = soft_hard_loss(out.logits, t_logits, batch["labels"], d.alpha if self.distilling else 0.0,
                                        d.temperature, d.kl)
        if use_hidden or use_att:
            if self._teacher_dev is None:
                self._teacher_dev = self.teacher.to(out.logits.device)
            with torch.no_grad():
                t_out = self._teacher_dev(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          output_hidden_states=use_hidden, output_attentions=use_att)
            mask = batch["attention_mask"]
            if use_hidden:
                hl = 0.0
                for i, tl in enumerate(self.mapping):
                    s_h = out.hidden_states[i + 1]
                    if len(self.projections):
                        s_h = self.projections[i].to(s_h.device)(s_h)
                    hl = hl + hidden_state_loss(s_h, t_out.hidden_states[tl + 1], mask, d.hidden_loss)
                hl = hl / len(self.mapping)
                loss = loss + d.hidden_weight * hl
                logs["hidden"] = float(hl.detach())
            if use_att:
                al = sum(attention_loss(out.attentions[i], t_out.attentions[tl], mask)
                         for i, tl in enumerate(self.mapping)) / len(self.mapping)
                loss = loss + d.attention_weight * al
                logs["attention"] = float(al.detach())
        return loss, logs


@dataclass
class Teaching:
    """What one round learns from: targets per training row, and the model whose states are matched."""

    logits: torch.Tensor | None  # soft targets (None: hard labels only)
    hard_labels: torch.Tensor | None  # the teacher's labels, when it gave labels only
    model: nn.Module | None  # for hidden-state / attention matching
    student_copied_from_it: bool  # the student's layers were copied from this model (layer map follows them)


def _train_student(ctx: RunContext, stage: str, init: nn.Module, teach: Teaching, train_data, student_tok,
                   ckpt: Path, label: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build a fresh student from ``init`` and train it on ``teach``; returns it, its TrainResult and facts."""
    r, task, d = ctx.recipe, ctx.task, ctx.recipe.distill
    student, copied = build_student(ctx, init)
    distilling = stage == "distill"
    teacher = teach.model
    if distilling and (d.hidden_weight > 0 or d.attention_weight > 0) and teacher is not None \
            and student_tok.get_vocab() != ctx.tokenizer.get_vocab():
        raise RecipeError([
            "distill.hidden_weight / distill.attention_weight: hidden-state and attention matching need the "
            "student to share the teacher's tokenizer; set them to 0 or use a student with the same vocabulary"
        ])
    n_teacher = (teacher or init).config.num_hidden_layers
    mapping = layer_map(student.config.num_hidden_layers, n_teacher, copied if teach.student_copied_from_it else None)
    loss_fn = DistillLoss(student, d, soft_logits=teach.logits, hard_labels=teach.hard_labels, teacher=teacher,
                          mapping=mapping, distilling=distilling, seed=r.seed)

    ctx.say(f"[bold]{stage}[/]: {student.config.num_hidden_layers}-layer student"
            + (f" from teacher layers {copied}" if copied else f" from {r.student.model}"))
    with loss_fn.attention_maps(student):
        res = train(student, train_data, d.train, loss_fn, seed=r.seed, precision=r.runtime.precision,
                    ckpt_root=ckpt, description=label, extra_params=loss_fn.extra_params())
    val_data = ctx.tokenized("validation", student_tok)
    val_logits = predict(student, val_data, r.eval.batch_size, f"{stage} validation")
    facts = {
        "validation": task.metrics({"logits": val_logits}, val_data.labels),
        "layers_from_teacher": copied,
        "layer_map": mapping,
        "teacher_forward_per_step": bool(loss_fn.use_hidden or loss_fn.use_att),
    }
    return student, res, facts


def run_student_stage(ctx: RunContext, stage: str) -> dict[str, Any]:
    """``stage`` is 'distill' (soft targets + optional matching, ``distill.rounds`` born-again rounds)
    or 'baseline' (hard labels only)."""
    from edgekd.teachers.stage import load_targets, training_split

    r, task = ctx.recipe, ctx.task
    d = r.distill
    fp = stage_fingerprint(ctx, stage)
    t0 = time.perf_counter()
    student_tok = ctx.tokenizer if not r.student.model else task.load_tokenizer(r.student.model)
    if r.student.model:
        # Only the training here reads the student's own tokenizer: refuse one that gives other ids (the
        # recipe check does it up front when both tokenizers are on this machine).
        from edgekd.tasks.text.task import student_tokenizer_problem, tokenizer_difference

        why = tokenizer_difference(ctx.tokenizer, student_tok, task.max_length, ctx.splits.texts("train")[:512])
        if why:
            raise RecipeError([student_tokenizer_problem(r.student.model, r.teacher.model, why)])
    teacher, cached_logits = load_teacher_outputs(ctx)
    if teacher is not None:
        init = teacher
    else:
        # A black-box teacher has no weights: the student is built from the local model in teacher.model
        # (its fresh task head seeded like the rest of the run).
        set_seed(r.seed)
        init = task.load_model(r.teacher.model, where="teacher.model")
    distilling = stage == "distill"
    if distilling:
        targets = load_targets(ctx, cached_logits)
        train_data = training_split(ctx, student_tok, targets)
        teach = Teaching(None if targets.hard else torch.from_numpy(targets.logits),
                         torch.from_numpy(targets.teacher_labels()) if targets.hard else None, teacher, True)
    else:
        train_data = ctx.tokenized("train", student_tok)
        teach = Teaching(None, None, None, True)

    rounds = d.rounds if distilling else 1
    ckpt = ctx.checkpoint_dir(stage, fp)
    label = "distill" if distilling else "baseline (hard labels)"
    history: list[dict[str, Any]] = []
    for k in range(1, rounds + 1):
        if rounds > 1:
            ctx.say(f"[bold]{stage}[/]: born-again round {k} of {rounds}, taught by "
                    + ("the teacher" if k == 1 else f"the round {k - 1} student"))
        student, res, facts = _train_student(ctx, stage, init, teach, train_data, student_tok,
                                             ckpt if rounds == 1 else ckpt / f"round-{k}",
                                             label if rounds == 1 else f"{label} round {k}/{rounds}")
        history.append({"round": k, "teacher": "teacher" if k == 1 else f"round {k - 1} student",
                        "validation": facts["validation"], "train_seconds": round(res.seconds, 2),
                        "train_history": res.history})
        if k < rounds:
            # The next round learns from this student's soft targets on the same rows (and may match its states).
            soft = predict(student, train_data, r.eval.batch_size, f"round {k} student outputs",
                           precision=r.runtime.precision)
            teach = Teaching(torch.from_numpy(soft), None, student, False)
    out_dir = ctx.model_dir(stage)
    if ctx.is_main:
        task.save_model(student, student_tok, out_dir)
    metrics = {
        **facts,
        "train_history": res.history,
        "train_seconds": round(sum(h["train_seconds"] for h in history), 2),
        "resumed_from_epoch": res.resumed_from_epoch,
        "params": sum(p.numel() for p in student.parameters()),
        "train_examples": len(train_data),
    }
    if distilling:
        metrics["hard_teacher_targets"] = targets.hard
    if rounds > 1:
        metrics["rounds"] = history
    if ctx.is_main:
        shutil.rmtree(ckpt, ignore_errors=True)
        ctx.run.record(stage, fp, metrics, [out_dir], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics
