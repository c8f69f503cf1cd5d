"""The prune stage: a schedule of steps, each removing a share and followed by recovery.

``prune_model`` never trains by itself: recovery is the caller's ``recover(model, step)`` (the
pipeline passes distillation from the teacher), so this module does not import the training loop.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from torch import nn

from edgekd.errors import StageError
from edgekd.pruning.base import PruneContext, StepGoal, count_params, get_method
from edgekd.recipe import PruneConfig

log = logging.getLogger(__name__)

MAX_SEARCH_ROUNDS = 100  # the floors stop a search long before; a guard against a method that never does


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fixed_goals(cfg: PruneConfig, prunable0: int) -> list[StepGoal]:
    """One goal per step for the targets known in advance (not latency)."""
    n = cfg.steps or 1
    if cfg.keep_params is not None:
        # Linear in parameters: step i ends at 1 - (1 - keep) * i / n of the original.
        return [StepGoal(param_budget=round(prunable0 * (1 - (1 - cfg.keep_params) * (i + 1) / n))) for i in range(n)]
    if cfg.sparsity is not None:
        return [StepGoal(sparsity=cfg.sparsity * (i + 1) / n) for i in range(n)]
    heads = _split(cfg.remove_heads or 0, n)
    neurons = _split(cfg.remove_neurons or 0, n)
    return [StepGoal(heads=h or None, neurons=m or None) for h, m in zip(heads, neurons, strict=True)]


def _evaluate(ctx: PruneContext, model: nn.Module) -> dict[str, float] | None:
    return dict(ctx.evaluate(model)) if ctx.evaluate is not None else None


def prune_model(model: nn.Module, cfg: PruneConfig, ctx: PruneContext) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` (in place; the returned model is the one to use) towards ``cfg``'s target.

    Returns the model and metrics: parameters, structure before/after (heads and neurons per
    layer, channels, or sparsity and gzip size), the metric and parameters after every step,
    latency before/after when ``ctx.latency_fn`` is given, and whether the target was reached.
    """
    targets = [cfg.keep_params, cfg.remove_heads, cfg.remove_neurons, cfg.target_latency_ms, cfg.max_accuracy_drop,
               cfg.sparsity]
    if all(t is None for t in targets) and not cfg.trim_vocab:
        raise StageError(
            "no pruning target: set one of prune.keep_params, prune.remove_heads/remove_neurons, "
            "prune.target_latency_ms, prune.max_accuracy_drop, prune.sparsity"
        )
    if cfg.trim_vocab and all(t is None for t in targets):
        # The caller trimmed the vocabulary before this call; recover from that alone.
        before = _evaluate(ctx, model)
        steps = []
        if ctx.recover is not None:
            t0 = time.perf_counter()
            model = ctx.recover(model, 1)
            steps.append({"step": 1, "trim_vocab": True, "recovered": True, "metric": _evaluate(ctx, model),
                          "seconds": round(time.perf_counter() - t0, 3)})
        return model, {"method": "none (prune.trim_vocab only)", "params_before": count_params(model),
                       "params_after": count_params(model), "steps": steps, "metric_before": before,
                       "metric_after": steps[-1]["metric"] if steps else before, "target": None,
                       "target_reached": True}
    if cfg.target_latency_ms is not None and ctx.latency_fn is None:
        raise StageError("prune.target_latency_ms needs a latency function (PruneContext.latency_fn)")
    method = get_method(cfg.method)(model, cfg, ctx)
    prunable0 = method.prunable_params(model)
    if cfg.keep_params is not None:
        floor = method.min_prunable_params(model)
        if floor > cfg.keep_params * prunable0:
            raise StageError(
                f"prune.keep_params={cfg.keep_params} cannot be reached: what every layer must keep "
                f"(prune.min_heads_per_layer, prune.min_neurons_fraction) is {floor / prunable0:.3f} of "
                f"the prunable parameters. Raise keep_params or lower the floors."
            )
    metrics: dict[str, Any] = {
        "method": cfg.method, "importance": getattr(method, "importance", cfg.importance), "scope": cfg.scope,
        "params_before": count_params(model), "prunable_params_before": prunable0,
        "before": method.describe(model), "steps": [],
    }
    metrics["metric_before"] = _evaluate(ctx, model)
    metrics["latency_ms_before"] = ctx.latency_fn(model) if ctx.latency_fn is not None else None
    if getattr(ctx.latency_fn, "where", None):
        metrics["latency_timed_on"] = ctx.latency_fn.where
    if getattr(ctx.latency_fn, "form", None):  # which form it times (float, or the quantize section's setup)
        metrics["latency_timed_form"] = ctx.latency_fn.form

    if cfg.target_latency_ms is not None or cfg.max_accuracy_drop is not None:
        model = _search(model, method, cfg, ctx, metrics)
        latency = metrics["latency_ms_searched"]
    else:
        latency = None
        for i, goal in enumerate(fixed_goals(cfg, prunable0), start=1):
            t0 = time.perf_counter()
            model, info = method.step(model, goal)
            record = {"step": i, **info, "params": count_params(model),
                      "prunable_params": method.prunable_params(model)}
            if ctx.recover is not None:
                model = ctx.recover(model, i)
                record["recovered"] = True
            record["metric"] = _evaluate(ctx, model)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            metrics["steps"].append(record)

    model = method.finish(model)
    prunable = method.prunable_params(model)
    metrics.update({
        "params_after": count_params(model), "prunable_params_after": prunable,
        "kept_prunable_fraction": round(prunable / prunable0, 6) if prunable0 else None,
        "after": method.describe(model),
    })
    # Share of the prunable weights gone: zeros for unstructured, removed parameters otherwise.
    metrics["sparsity"] = (metrics["after"]["sparsity"] if "sparsity" in metrics["after"]
                           else round(1 - prunable / prunable0, 6) if prunable0 else 0.0)
    if latency is None or (cfg.target_latency_ms is None and cfg.max_accuracy_drop is None):
        latency = ctx.latency_fn(model) if ctx.latency_fn is not None else None
    metrics["latency_ms_after"] = latency
    if "metric_after" not in metrics:
        metrics["metric_after"] = metrics["steps"][-1]["metric"] if metrics["steps"] else metrics["metric_before"]
    metrics["target"], metrics["target_reached"] = _target_report(cfg, metrics, latency)
    return model, metrics


def _search(model: nn.Module, method: Any, cfg: PruneConfig, ctx: PruneContext, metrics: dict[str, Any]) -> nn.Module:
    """Rounds of ``latency_step``, each recovered, evaluated and timed, until the latency target is
    met, the accuracy budget would be exceeded (that round is undone: the last round in budget is
    kept), the floors leave nothing to remove, or ``steps`` rounds ran. Records why it stopped.

    The final recovery (``prune.final_recover_epochs``) is checked too, with a budget or a latency target
    alone: when it lowers validation, the model from before it ships and ``final_recovery`` says so
    (``shipped``, ``note``; with a budget ``within_budget``); ``metrics["within_budget"]`` is what ships
    against the budget, which counts from ``ctx.budget_baseline`` where the caller gives one (else from the
    model given); ``metrics["budget_baseline"]`` says which, beside the figure the search starts from."""
    budget, target = cfg.max_accuracy_drop, cfg.target_latency_ms
    base = None
    if budget is not None:
        base = _budget_baseline(ctx, metrics, budget)
    latency = metrics["latency_ms_before"]
    metrics["latency_ms_searched"] = latency
    if target is not None and latency is not None and latency <= target:
        metrics["stopped"] = "the unpruned model already meets prune.target_latency_ms"
        if budget is not None:
            metrics["within_budget"] = metrics["budget_baseline"]["search_start_within_budget"]
            _say_start_over_budget(metrics)
        return model
    rounds = cfg.steps or MAX_SEARCH_ROUNDS
    kept_metric = metrics["metric_before"]
    metrics["stopped"] = f"prune.steps={rounds} rounds ran out" if cfg.steps else f"{MAX_SEARCH_ROUNDS} rounds ran out"
    for i in range(1, rounds + 1):
        t0 = time.perf_counter()
        # Undoing a round needs the model as it was; copied before the step changes it in place.
        snapshot = copy.deepcopy(model) if budget is not None else None
        model, info = method.step(model, StepGoal(fraction=cfg.latency_step))
        record = {"step": i, **info, "params": count_params(model), "prunable_params": method.prunable_params(model)}
        if info.get("removed", 0) == 0:
            # A method may say which limit stopped it (channels: prune.max_channel_ratio).
            metrics["stopped"] = info.get("nothing_left") or (
                "nothing left to remove within the floors (prune.min_heads_per_layer, "
                "prune.min_neurons_fraction, prune.max_channel_ratio)")
            break
        if ctx.recover is not None:
            model = ctx.recover(model, i)
            record["recovered"] = True
        record["metric"] = _evaluate(ctx, model)
        if ctx.latency_fn is not None:
            record["latency_ms"] = ctx.latency_fn(model)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        metrics["steps"].append(record)
        if budget is not None:
            drop = base - _metric_value(record["metric"], ctx.metric)
            record["metric_drop"] = round(drop, 6)
            record["in_budget"] = drop <= budget
            if drop > budget:
                model = snapshot
                metrics["stopped"] = (f"round {i} dropped validation {ctx.metric} by {drop:.4f} > "
                                      f"prune.max_accuracy_drop={budget}: undone, round {i - 1} kept")
                break
        kept_metric, latency = record["metric"], record.get("latency_ms", latency)
        metrics["kept_step"] = i
        if target is not None and latency is not None and latency <= target:
            metrics["stopped"] = f"latency {latency:.3f} ms <= prune.target_latency_ms={target}"
            break
    metrics.setdefault("kept_step", 0)
    metrics["latency_ms_searched"] = latency
    metrics["metric_after"] = kept_metric
    if cfg.final_recover_epochs > 0 and metrics["kept_step"] > 0:
        if ctx.recover_final is None:
            raise StageError("prune.final_recover_epochs needs a final recovery function (PruneContext.recover_final)")
        # The kept model (in budget, with one) is kept aside, so a final recovery that makes it worse is not
        # shipped: with a budget or a latency target alone, wherever the stage evaluates.
        before_final = copy.deepcopy(model) if ctx.evaluate is not None else None
        t0 = time.perf_counter()
        model = ctx.recover_final(model)
        final = {"metric": _evaluate(ctx, model), "seconds": round(time.perf_counter() - t0, 3)}
        metrics["final_recovery"] = final
        metrics["metric_after"] = final["metric"]
        if before_final is not None:
            model = _check_final_recovery(model, before_final, cfg, ctx, metrics, base)
    if budget is not None:
        # What ships, final recovery included, against the budget (the report's target_reached reads it).
        metrics["within_budget"] = base - _metric_value(metrics["metric_after"], ctx.metric) <= budget
        if metrics["kept_step"] == 0:  # what ships is the model the search started from
            _say_start_over_budget(metrics)
    return model


def _budget_baseline(ctx: PruneContext, metrics: dict[str, Any], budget: float) -> float:
    """The figure ``prune.max_accuracy_drop`` counts from: ``ctx.budget_baseline`` where given (the text stage:
    the distilled student before its vocabulary trim), else the model given. Recorded in
    ``metrics["budget_baseline"]`` with the figure the search starts from and whether that one is in budget
    already (a ``note`` when it is not: only recovery can win it back; the caller says it, as it knows why)."""
    key = ctx.metric
    start = _metric_value(metrics["metric_before"], key)
    given = ctx.budget_baseline is not None
    base = _metric_value(ctx.budget_baseline, key) if given else start
    drop = base - start
    record = {"counts_from": ctx.budget_baseline_of if given else "the unpruned model", "metric": key,
              "baseline": base, "search_start": start, "search_start_drop": round(drop, 6),
              "search_start_within_budget": drop <= budget}
    if drop > budget:
        record["note"] = (
            f"the model the search starts from is already {drop:.4f} below {record['counts_from']} on validation "
            f"{key} ({start:.4f} against {base:.4f}), over prune.max_accuracy_drop={budget}: only the rounds' "
            "recovery can bring it back in budget, and if no round is kept what ships is out of budget")
    metrics["budget_baseline"] = record
    return base


def _say_start_over_budget(metrics: dict[str, Any]) -> None:
    """When the model the search started from ships and is itself over the budget, ``stopped`` says so."""
    rec = metrics["budget_baseline"]
    if not rec["search_start_within_budget"]:
        metrics["stopped"] += (f"; what ships is the model the search started from, {rec['search_start_drop']:.4f} "
                               f"below {rec['counts_from']}: over the budget")


def _check_final_recovery(model: nn.Module, before_final: nn.Module, cfg: PruneConfig, ctx: PruneContext,
                          metrics: dict[str, Any], base: float | None) -> nn.Module:
    """Compare the finally recovered model with the one the search kept (and, with a budget, with the
    unpruned one, ``base``); when the final recovery lowered validation, ship the model from before it (in
    budget: the search kept it) and say so."""
    final, budget, key = metrics["final_recovery"], cfg.max_accuracy_drop, ctx.metric
    after = _metric_value(final["metric"], key)
    kept = _metric_value(metrics["steps"][metrics["kept_step"] - 1]["metric"], key)
    drop = None if base is None or budget is None else base - after
    if drop is not None:
        final["metric_drop"] = round(drop, 6)
        final["within_budget"] = drop <= budget
    final["shipped"] = after >= kept
    if final["shipped"]:
        return model
    metrics["metric_after"] = metrics["steps"][metrics["kept_step"] - 1]["metric"]
    counts_from = (metrics.get("budget_baseline") or {}).get("counts_from", "the unpruned model")
    verdict = (f"{drop:.4f} below {counts_from}'s {base:.4f}, over prune.max_accuracy_drop={budget}"
               if drop is not None and drop > budget else f"below the {kept:.4f} it started from")
    final["note"] = (
        f"the final recovery (prune.final_recover_epochs={cfg.final_recover_epochs}) left validation {key} at "
        f"{after:.4f}, {verdict}: the model from before it (search round {metrics['kept_step']}, {key} "
        f"{kept:.4f}) ships instead. Shorten the final recovery or lower its rate (prune.final_recover_epochs, "
        "prune.recover_lr), or set prune.final_recover_epochs: 0")
    log.warning("prune: %s", final["note"])
    return before_final


def _metric_value(m: dict[str, float] | None, key: str) -> float:
    if m is None:
        raise StageError("prune.max_accuracy_drop needs an evaluation function (PruneContext.evaluate)")
    if key not in m:
        raise StageError(f"prune.max_accuracy_drop: the evaluation gave no '{key}' (it gave {sorted(m)})")
    return float(m[key])


def _target_report(cfg: PruneConfig, m: dict[str, Any], latency: float | None) -> tuple[dict[str, Any], bool]:
    target, reached = _main_target(cfg, m, latency)
    if cfg.hidden_size is not None:  # on top of the target: the residual width the model must end at
        target["hidden_size"] = cfg.hidden_size
        reached = reached and (m.get("after") or {}).get("hidden_size") == cfg.hidden_size
    return target, reached


def _main_target(cfg: PruneConfig, m: dict[str, Any], latency: float | None) -> tuple[dict[str, Any], bool]:
    # With a budget, what ships (after any final recovery) must be in it: m["within_budget"].
    in_budget = m.get("within_budget", True) is not False
    if cfg.target_latency_ms is not None:
        target = {"latency_ms": cfg.target_latency_ms}
        if cfg.max_accuracy_drop is not None:
            target["max_accuracy_drop"] = cfg.max_accuracy_drop
        return target, latency is not None and latency <= cfg.target_latency_ms and in_budget
    if cfg.max_accuracy_drop is not None:
        # Every kept round is in budget (an over-budget one is undone) and so is what ships, final recovery
        # included; reached = at least one round kept.
        return {"max_accuracy_drop": cfg.max_accuracy_drop}, m.get("kept_step", 0) > 0 and in_budget
    if cfg.keep_params is not None:
        # Heads and neurons come in whole units: within one unit's worth of the budget counts as met.
        return {"keep_params": cfg.keep_params}, m["kept_prunable_fraction"] <= cfg.keep_params + 0.01
    if cfg.sparsity is not None:
        return {"sparsity": cfg.sparsity}, m["after"]["sparsity"] >= cfg.sparsity - 1e-3
    removed_h = sum(s.get("removed_heads", 0) for s in m["steps"])
    removed_n = sum(s.get("removed_neurons", 0) for s in m["steps"])
    ok = removed_h >= (cfg.remove_heads or 0) and removed_n >= (cfg.remove_neurons or 0)
    return {"remove_heads": cfg.remove_heads, "remove_neurons": cfg.remove_neurons}, ok
