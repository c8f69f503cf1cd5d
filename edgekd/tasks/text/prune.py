"""The prune stage of text classification (with distillation from the teacher to recover).

An adapter from the run context to ``edgekd.pruning.prune_model``: which model, which batches
score importance, how recovery trains, the optional vocabulary trim, and what goes into the
manifest. What every family's prune stage shares is in ``edgekd.stages.prune_common``.
"""

from __future__ import annotations

import copy
import shutil
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from edgekd.context import RunContext
from edgekd.errors import StageError
from edgekd.losses import ensemble_logits, hidden_state_loss, soft_hard_loss, teacher_labels_loss
from edgekd.quantization.fake_quant import dynamic_int8_training
from edgekd.runfolder import fingerprint
from edgekd.stages.base import load_stage_model
from edgekd.stages.prune_common import (
    LATENCY_EXAMPLES,
    prune_settings,
    recovery_train_config,
    say_search,
    search_timing_settings,
    shipped_latency_fn,
)
from edgekd.tasks.text.distill import stage_fingerprint
from edgekd.train import predict, to_torch, train

SOUP_SEED_STRIDE = 7919  # prune.recover_soup: copy i trains with seed + stride * i
FRESH_SEED_OFFSET = 104729  # prune.recover_fresh_copies: their perturbations' seed is teacher.augment's + this


def soup(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of several state dicts of one architecture (floating tensors averaged in
    float32; integer buffers, e.g. position ids, must agree and are kept)."""
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            out[k] = (torch.stack([s[k].float() for s in states]).mean(0)).to(first.dtype)
        else:
            if any(not torch.equal(s[k], first) for s in states[1:]):
                raise StageError(f"prune.recover_soup: the copies disagree on integer tensor {k!r}")
            out[k] = first
    return out


def prune_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    settings = {"prune": prune_settings(r.prune), "distill": stage_fingerprint(ctx, "distill"), "seed": r.seed}
    if r.prune.quant_aware:  # the rounding it trains with
        settings["int8"] = {k: v for k, v in _int8_rounding(r).items() if k != "ranges"}  # ranges: the prune section's
    if r.prune.trim_vocab:  # trimmed before pruning and recovery (it used to follow them)
        settings["vocab_order"] = "trim-then-recover"
        if r.prune.max_accuracy_drop is not None:  # the budget counts from before the trim (it counted from after)
            settings["budget_from"] = "before-trim"
    if r.prune.recover_soft_targets == "teacher" and all(m.targets == "labels" for m in r.teacher.members()):
        settings["labels_only_recovery"] = "cross-entropy"  # the recovery learns the labels as distill did
    if r.teacher.unlabelled.dataset or r.teacher.augment.copies:
        # the recoveries train on the distillation set: the training split and the teacher-labelled extra texts
        settings["recover_on"] = "train+extra"
    if r.prune.target_latency_ms is not None or r.prune.max_accuracy_drop is not None:
        # the search times the shipped form, which this key changes
        settings["first_token_last_layer"] = r.export.first_token_last_layer
    return fingerprint({**settings, **search_timing_settings(r)})


def _int8_rounding(r) -> dict[str, Any]:
    q = r.quantize
    return {"per_channel": q.per_channel, "weight_type": q.weight_type, "reduce_range": q.reduce_range,
            "ranges": r.prune.quant_aware_ranges}


def fresh_copies(ctx: RunContext, teacher, targets):
    """``targets`` with prune.recover_fresh_copies more rows: perturbed copies of the training texts that
    the teacher stage did not label (teacher.augment's perturbations, its seed + FRESH_SEED_OFFSET), with
    the teacher's log-probabilities, as the teacher stage stores its targets. Returns them and a summary."""
    from edgekd.errors import RecipeError
    from edgekd.tasks.text.task import TokenizedSplit
    from edgekd.teachers.augment import augment_texts
    from edgekd.teachers.combine import as_probabilities, log_targets
    from edgekd.teachers.stage import TeacherTargets

    r = ctx.recipe
    if teacher is None or targets.hard:
        raise RecipeError(["prune.recover_fresh_copies: the copies are labelled by one local teacher's soft "
                           "targets, and this run's teacher gives none: set it to 0"])
    aug = r.teacher.augment.model_copy(update={"copies": r.prune.recover_fresh_copies})
    seed = (r.seed if aug.seed is None else aug.seed) + FRESH_SEED_OFFSET
    made = augment_texts(ctx.splits.texts("train"), aug, seed, ctx.examples.texts, targets.unlabelled_texts)
    tok = ctx.tokenizer
    ids = ctx.task.tokenize(tok, made.texts)
    data = TokenizedSplit(ids, np.zeros(len(ids), dtype=np.int64), tok.pad_token_id or 0)
    logits = predict(teacher, data, r.eval.batch_size, "prune: the teacher on fresh copies",
                     precision=r.runtime.precision)
    # The form the teacher stage caches its targets in (float32 log-probabilities, floored).
    logp = log_targets(as_probabilities(logits, "logits", logits.shape[1]))
    ctx.say(f"[bold]prune[/]: {len(made.texts)} fresh perturbed copies of the training texts for the recovery")
    out = TeacherTargets(np.concatenate([targets.logits, logp]), False,
                         targets.train_rows, [*targets.unlabelled_texts, *made.texts])
    return out, {**made.summary(), "seed": seed}


def load_pruned(ctx: RunContext):
    """The pruned student (its own architecture: heads and FFN widths per layer), once the stage is
    known to be current (see ``edgekd.stages.base.load_stage_model``)."""
    from edgekd.pruning import load_pruned_model

    return load_pruned_model(ctx.model_dir("prune"))


def _check_pruned(ctx: RunContext) -> None:
    why = ctx.run.stale_reason("prune", prune_fingerprint(ctx))
    if why:
        raise StageError(f"The prune stage of run '{ctx.recipe.name}' is missing or out of date ({why}). "
                         "Run `edgekd prune` (or `edgekd run`) first.")


def load_pruned_tokenizer(ctx: RunContext):
    """The tokenizer saved with the pruned student (rewritten by ``prune.trim_vocab``); one object
    per context, so the tokenized splits it keys are cached once."""
    cache = ctx.__dict__.setdefault("_pruned_tokenizer", {})
    if "tok" not in cache:
        _check_pruned(ctx)
        cache["tok"] = ctx.task.load_tokenizer(ctx.model_dir("prune"))
    return cache["tok"]


def run_prune(ctx: RunContext) -> dict[str, Any]:
    from edgekd.pruning import PruneContext, prune_model
    from edgekd.tasks.text.teacher import load_teacher_outputs
    from edgekd.teachers.stage import load_targets, training_split

    r, task, cfg = ctx.recipe, ctx.task, ctx.recipe.prune
    t0 = time.perf_counter()
    fp = prune_fingerprint(ctx)
    model = load_stage_model(ctx, "distill")
    teacher, cached_logits = load_teacher_outputs(ctx)
    # Recovery is distillation: it trains on what the distill stage trained on, the training split and
    # any texts the teacher labelled beside it (teacher.unlabelled, teacher.augment), one target row each.
    targets = load_targets(ctx, cached_logits)
    fresh = None
    if cfg.recover_fresh_copies:
        targets, fresh = fresh_copies(ctx, teacher, targets)
    del teacher
    teacher_logits = torch.from_numpy(targets.logits)
    # The distilled student reads the teacher's token ids.
    tok = ctx.tokenizer
    vocab_info = None
    if cfg.trim_vocab:
        # Trim first: scoring, every recovery and the search then see the trimmed model on the trimmed
        # tokenizer's ids, so recovery also wins back what trimming cost. The tokens kept are those of
        # the training split's texts.
        model, tok, vocab_info = _trim_vocab(ctx, model, ctx.tokenized("train", tok))
        _say_trim_against_budget(ctx, vocab_info)
    train_data = training_split(ctx, tok, targets)
    val_data = ctx.tokenized("validation", tok)
    batches = train_data.train_batches(r.distill.train.batch_size, seed=r.seed)[: cfg.score_batches]
    # The recovery's loss finds each batch's soft targets by its rows' "index"; the labels loss (the
    # model's own) takes only model inputs and labels.
    keep_index = cfg.score_loss == "recovery"
    score_batches = [
        {k: v for k, v in to_torch(train_data.collate(idx)).items() if keep_index or k != "index"} for idx in batches
    ]
    # The unpruned student, frozen (same width and depth as the pruned one): the hidden-state targets,
    # and with recover_soft_targets 'unpruned' the soft targets too ('teacher+unpruned': half of them).
    from_unpruned = cfg.recover_soft_targets in ("unpruned", "teacher+unpruned")
    hidden = cfg.recover_hidden_weight > 0
    reference = copy.deepcopy(model).eval().requires_grad_(False) if hidden or from_unpruned else None
    d = r.distill
    alpha = cfg.recover_alpha if cfg.recover_alpha is not None else d.alpha
    temperature = cfg.recover_temperature if cfg.recover_temperature is not None else d.temperature
    # Every teacher gave labels only: its rows are one-hot, so the recovery learns them with cross-entropy as
    # the distill stage did (a T-softened one-hot is still one-hot; T²·KL only scaled the term by about T).
    hard_teacher = targets.hard and cfg.recover_soft_targets == "teacher"

    def evaluate(m) -> dict[str, float]:
        return task.metrics({"logits": predict(m, val_data, r.eval.batch_size, "prune: validation")},
                            val_data.labels)

    def recovery_loss(mm, batch):
        """The recovery's loss (and its logs): soft targets and hard labels, plus hidden-state matching
        against the unpruned student when prune.recover_hidden_weight asks for it."""
        out = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        ref_out = None
        if reference is not None:
            ref = reference.to(out.logits.device)
            with torch.no_grad():
                ref_out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=hidden)
        sources = []
        if cfg.recover_soft_targets != "unpruned":
            sources.append(teacher_logits[batch["index"].cpu()].to(out.logits.device))
        if from_unpruned:
            sources.append(ref_out.logits.float())
        if hard_teacher:  # the teacher's labels, as the distill stage learnt them (DistillLoss)
            loss, logs = teacher_labels_loss(out.logits, sources[0].argmax(-1), batch["labels"], alpha)
        else:
            t = sources[0] if len(sources) == 1 else ensemble_logits(sources, temperature)
            loss, logs = soft_hard_loss(out.logits, t, batch["labels"], alpha, temperature, d.kl)
        if hidden:
            # Every layer's output (index 0 is the shared embedding output, left out).
            pairs = list(zip(out.hidden_states[1:], ref_out.hidden_states[1:], strict=True))
            hl = sum(hidden_state_loss(s, h, batch["attention_mask"], d.hidden_loss) for s, h in pairs) / len(pairs)
            loss = loss + cfg.recover_hidden_weight * hl
            logs["hidden"] = float(hl.detach())
        return loss, logs

    def recover_for(epochs: float, step: int, label: str):
        def run(m):
            tc = recovery_train_config(r, epochs)
            ckpt = ctx.checkpoint_dir("prune", f"{fp}-{label}")
            rounding = dynamic_int8_training(m, **_int8_rounding(r)) if cfg.quant_aware else nullcontext()
            n = cfg.recover_soup
            start = {k: v.detach().clone() for k, v in m.state_dict().items()} if n > 1 else None
            states = []
            with rounding:
                for i in range(n):
                    if i:
                        m.load_state_dict(start)
                    copy_label = f" (copy {i + 1} of {n})" if n > 1 else ""
                    train(m, train_data, tc, recovery_loss, seed=r.seed + step + SOUP_SEED_STRIDE * i,
                          precision=r.runtime.precision, ckpt_root=ckpt / f"copy{i}" if n > 1 else ckpt,
                          description=f"prune: recover {label}{copy_label}"
                          + (" (int8-aware)" if cfg.quant_aware else ""))
                    if n > 1:
                        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
            if n > 1:
                m.load_state_dict(soup(states))
            shutil.rmtree(ckpt, ignore_errors=True)
            return m

        return run

    def recover(m, step: int):
        return recover_for(cfg.recover_epochs, step, f"step{step}")(m)

    search = cfg.target_latency_ms is not None or cfg.max_accuracy_drop is not None
    latency_fn = None
    if search:
        val_inputs = val_data.collate(np.arange(min(len(val_data), LATENCY_EXAMPLES)))
        latency_fn = shipped_latency_fn(ctx, {k: val_inputs[k] for k in ("input_ids", "attention_mask")})
    pctx = PruneContext(score_batches=score_batches, evaluate=evaluate,
                        loss_fn=(lambda m, batch: recovery_loss(m, batch)[0]) if keep_index else None,
                        recover=recover if cfg.recover_epochs > 0 else None, latency_fn=latency_fn,
                        recover_final=recover_for(cfg.final_recover_epochs, 1000, "final"),
                        metric=task.primary_metric,
                        # prune.max_accuracy_drop counts from the distilled student as it came, before any
                        # vocabulary trim: the trim's cost is spent out of the same budget.
                        budget_baseline=vocab_info["before"]["validation"] if vocab_info else None,
                        budget_baseline_of=TRIM_BASELINE)
    model, metrics = prune_model(model, cfg, pctx)
    metrics["recover_soft_targets"] = cfg.recover_soft_targets
    metrics["recover_alpha"] = alpha
    metrics["recover_temperature"] = temperature
    if cfg.quant_aware:
        metrics["quant_aware"] = {"int8": "dynamic", **_int8_rounding(r)}
    metrics["recover_examples"] = len(train_data)
    if fresh is not None:
        metrics["recover_fresh_copies"] = fresh
    say_search(ctx, cfg, metrics)
    out_tok = tok
    if vocab_info is not None:
        metrics["vocab"] = vocab_info
    out_dir = ctx.model_dir("prune")
    if ctx.is_main:
        task.save_model(model, out_tok, out_dir)
        metrics["size_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
        ctx.run.record("prune", fp, metrics, [out_dir], seconds=time.perf_counter() - t0)
    # Later stages of this process use the tokenizer just saved. One loaded before is stale but kept
    # referenced: tokenized splits are cached by id(tokenizer), which a freed object could hand on.
    if cfg.trim_vocab:
        cache = ctx.__dict__.setdefault("_pruned_tokenizer", {})
        cache.setdefault("stale", []).append(cache.get("tok"))
        cache["tok"] = out_tok
    ctx.sync()
    return metrics


TRIM_BASELINE = "the distilled student before prune.trim_vocab"


def _say_trim_against_budget(ctx: RunContext, info: dict[str, Any]) -> None:
    """With prune.max_accuracy_drop, say plainly when the vocabulary trim alone already spent more than the
    budget, which counts from the distilled student before the trim (the record: ``budget_baseline``)."""
    budget, key = ctx.recipe.prune.max_accuracy_drop, ctx.task.primary_metric
    if budget is None:
        return
    before, after = info["before"]["validation"][key], info["after"]["validation"][key]
    if before - after > budget:
        ctx.say(f"[bold red]prune: the vocabulary trim alone lowered validation {key} by {before - after:.4f} "
                f"({before:.4f} -> {after:.4f}), more than prune.max_accuracy_drop={budget}[/], which counts from "
                "the distilled student before the trim: only the search's recoveries can win it back, and if no "
                "round is kept what ships is out of budget (target not reached). Keep more tokens "
                "(prune.vocab_min_count, vocab_keep_chars, vocab_keep_first), raise the budget or drop the trim")


def _trim_vocab(ctx: RunContext, model, train_data) -> tuple[Any, Any, dict[str, Any]]:
    """Keep the tokens the training texts use; measure validation and test just before and just after
    (no retraining in between: what trimming alone costs; the recoveries that follow win it back)."""
    from edgekd.pruning.vocab import domain_token_ids, trim_vocabulary

    r, task, cfg = ctx.recipe, ctx.task, ctx.recipe.prune
    tok = ctx.tokenizer

    def scores(m, tk) -> dict[str, dict[str, float]]:
        out = {}
        for split in ("validation", "test"):
            data = ctx.tokenized(split, tk)
            out[split] = task.metrics({"logits": predict(m, data, r.eval.batch_size, f"prune: vocab {split}")},
                                      data.labels)
        return out

    vocab0 = model.get_input_embeddings().num_embeddings
    if vocab0 < len(tok):
        raise StageError(f"vocabulary trimming: the model has {vocab0} token embeddings but the teacher's tokenizer "
                         f"has {len(tok)} tokens, so its ids do not address this model (trimmed already?); trim "
                         "the distilled student (e.g. prune_variants.py RUN trim@distill)")
    before = scores(model, tok)
    params0 = sum(p.numel() for p in model.parameters())
    keep = domain_token_ids(train_data.input_ids, tok, cfg.vocab_min_count, cfg.vocab_keep_chars,
                            cfg.vocab_keep_first)
    model, new_tok = trim_vocabulary(model, tok, keep)
    after = scores(model, new_tok)
    info = {"vocab_before": vocab0, "vocab_after": len(keep), "params_before": params0,
            "params_after": sum(p.numel() for p in model.parameters()), "min_count": cfg.vocab_min_count,
            "keep_chars": cfg.vocab_keep_chars, "keep_first": cfg.vocab_keep_first, "before": before, "after": after}
    ctx.say(f"prune: vocabulary {vocab0} -> {len(keep)} tokens, parameters {params0} -> {info['params_after']}; "
            f"validation {task.primary_metric} {before['validation'][task.primary_metric]:.4f} -> "
            f"{after['validation'][task.primary_metric]:.4f}")
    return model, new_tok, info


