"""The bench stage, the same for every task family: every exported artifact (and, when asked, the
PyTorch models) timed and scored on a device profile by ``edgekd.devices.bench.bench_run``."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape

from edgekd.context import RunContext
from edgekd.runfolder import fingerprint
from edgekd.stages.base import load_stage_model, stage_fingerprint
from edgekd.stages.export import export_fingerprint, load_source, source_stage
from edgekd.stages.quantize import quantize_fingerprint


def bench_fingerprint(ctx: RunContext) -> str:
    parts = {"bench": ctx.recipe.bench.model_dump(mode="json"), "export": export_fingerprint(ctx),
             "eval": stage_fingerprint(ctx, "eval")}
    if getattr(ctx.recipe, "eval", None) is not None and ctx.recipe.eval.ood_dataset:
        parts["ood"] = [ctx.recipe.eval.ood_dataset, ctx.recipe.eval.ood_min_abs_score]
    if ctx.recipe.quantize.enabled:
        parts["quantize"] = quantize_fingerprint(ctx)
    p = ctx.recipe.prune
    if p.enabled and getattr(p, "trim_vocab", False):
        # Since 2026-12-03 the unpruned models of a trimmed run are scored on their own tokenizer's ids:
        # a trimmed run benched before re-benches (other runs keep their fingerprints).
        parts["unpruned_models_scored_on"] = "their own tokenizer's ids"
        # Since 2026-12-07 they are timed on them too (the trimmed ids of a text are longer): re-bench.
        parts["unpruned_models_timed_on"] = "their own tokenizer's ids"
    return fingerprint(parts)


def run_bench(ctx: RunContext, profile: str | None = None) -> dict[str, Any]:
    from edgekd.devices.bench import bench_run

    r, task = ctx.recipe, ctx.task
    t0 = time.perf_counter()
    inputs, labels = ctx.parity_data(r.bench.eval_examples)
    torch_models, own = None, None
    if r.bench.torch_models:
        teacher = load_stage_model(ctx, "teacher")
        # the fp32 distilled student is the reference the compressed artifacts are judged against
        torch_models = {"student": (task.export_module(load_stage_model(ctx, "distill")), task.model_io())}
        if source_stage(ctx) == "prune":
            torch_models["student-pruned"] = (task.export_module(load_source(ctx)), task.model_io())
        if teacher is not None:  # a black-box teacher has no weights here to time
            torch_models = {"teacher": (task.export_module(teacher), task.model_io()), **torch_models}
        unwrapped = torch_models

        def own() -> dict[str, Any]:  # called by the bench only when it measured a PyTorch model
            return {f"pytorch-{k}": v for k, v in ctx.bench_own_outputs(unwrapped, r.bench.eval_examples).items()}

        torch_models = ctx.bench_torch_models(torch_models)
    ood = ctx.ood_data()
    not_current = None
    if not r.quantize.enabled:  # its folders are an earlier quantize run's, which this recipe no longer makes
        from edgekd.stages.quantize import quantized_folder_names

        not_current = {p.name: "made by a quantize stage this recipe turns off (quantize.enabled: false): an "
                       "earlier setup's model, not measured as current" for p in
                       quantized_folder_names(ctx.run.stage_dir("export"))}
    result = bench_run(ctx.run.root, profile or r.bench.profile, r.bench, inputs, labels, task.metrics,
                       torch_models, metric=task.primary_metric, input_desc=ctx.input_desc(), ood=ood,
                       own_outputs=own, not_current=not_current,
                       original_inputs=ctx.bench_original_inputs(r.bench.eval_examples) if torch_models else None)
    target = latency_target_check(ctx, result)
    if target:
        result["target_latency"] = target
        line = escape(target_latency_line(target))
        ctx.say(line if target["met"] else f"[bold red]{line}[/]")
    ctx.run.record("bench", bench_fingerprint(ctx), result, seconds=time.perf_counter() - t0)
    return result


def latency_target_check(ctx: RunContext, result: dict[str, Any]) -> dict[str, Any] | None:
    """``prune.target_latency_ms`` against what ships, as this bench timed it. The prune stage meets the
    target on the form its search times (the quantize section's first setup, at the bench's threads, on
    this machine); the file that ships is the quantize stage's choice among its candidates, timed here on
    the bench profile (another device included). None when the run sets no target; else the target, the
    shipped export, its p50 at batch 1 and whether it is met, or why it could not be compared."""
    from edgekd.shipping import shipped_export

    p = ctx.recipe.prune
    if not p.enabled or p.target_latency_ms is None:
        return None
    name, why = shipped_export(ctx.run.root)
    check: dict[str, Any] = {"target_ms": p.target_latency_ms, "shipped": name, "profile": result.get("profile"),
                             "p50_ms": None, "met": None,
                             # what the advice of an unmet target reads (target_latency_line)
                             "prune_method": p.method, "max_accuracy_drop": p.max_accuracy_drop,
                             "quantize": ctx.recipe.quantize.enabled}
    head = result.get("headline") or {}
    row = (result.get("models") or {}).get(name) if name else None
    if name is None:
        check["why_not"] = f"nothing ships as the run stands: {why}"
    elif head.get("batch") != 1:
        check["why_not"] = (f"the bench's first batch size is {head.get('batch')}, and the target is a batch-1 "
                            "latency: put 1 first in bench.batch_sizes")
    elif not row or row.get("p50_ms") is None:
        check["why_not"] = f"the bench did not time {name} ({(row or {}).get('status') or 'not in the bench'})"
    else:
        check.update(p50_ms=row["p50_ms"], met=bool(row["p50_ms"] <= p.target_latency_ms), seq=head.get("seq"))
    return check


def target_latency_line(check: dict[str, Any]) -> str:
    """The console's and the summary's line for :func:`latency_target_check`'s record (plain text)."""
    head = f"prune.target_latency_ms={check['target_ms']:g}"
    if check.get("met") is None:
        return f"{head}: not checked against what ships: {check.get('why_not')}"
    where = f"p50 {check['p50_ms']:.3f} ms at batch 1 on {check.get('profile')}"
    if check["met"]:
        return f"{head}: met by the shipped {check['shipped']} ({where})"
    return (f"{head}: NOT met by the shipped {check['shipped']} ({where}; the prune search timed "
            f"its own form on this machine): {_not_met_advice(check)}")




def _not_met_advice(check: dict[str, Any]) -> str:
    """What to do about a target the shipped file misses, as the prune stage says it (raise the target, or
    prune further, or a smaller student), with what the run has on: a budget that may have stopped the search,
    and a quantize stage whose choice may not be the form the search timed. A check recorded before these were
    recorded gets the advice without them."""
    from edgekd.stages.prune_common import unmet_target_advice

    advice = unmet_target_advice(check.get("prune_method"), check.get("max_accuracy_drop"))
    if check.get("quantize"):
        advice += ("; the search timed the quantize section's own setup, and the quantize stage's guards may ship "
                   "another form (float where int8 is not faster): see its record, or give it a faster setup "
                   "that passes its accuracy guard (quantize.candidates)")
    return advice
