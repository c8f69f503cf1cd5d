"""The bench stage, the same for every task family: every exported artifact (and, when asked, the
PyTorch models) timed and scored on a device profile by ``edgekd.devices.bench.bench_run``."""

from __future__ import annotations

import time
from typing import Any

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
                       own_outputs=own, not_current=not_current)
    ctx.run.record("bench", bench_fingerprint(ctx), result, seconds=time.perf_counter() - t0)
    return result
