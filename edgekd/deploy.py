"""The deployment stages of the pipeline: export (and its parity checks) and bench.

Thin adapters from the run context to ``edgekd.export.stage.export_all`` and
``edgekd.devices.bench.bench_run``: which model is the source, which examples are real, which
figures go into the manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekd.context import RunContext
from edgekd.errors import StageError
from edgekd.runfolder import fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def source_stage(ctx: RunContext) -> str:
    """The model that ships: the pruned student when the recipe prunes, else the distilled one."""
    return "prune" if ctx.recipe.prune.enabled else "distill"


def _source_fingerprint(ctx: RunContext) -> str:
    return ctx.stage_fp(source_stage(ctx))


def load_source(ctx: RunContext):
    return ctx.load_stage_model(source_stage(ctx))


def export_fingerprint(ctx: RunContext) -> str:
    return fingerprint({"export": ctx.recipe.export.model_dump(mode="json"), "source": _source_fingerprint(ctx),
                        "data": ctx.data_fingerprint})


def run_export(ctx: RunContext) -> dict[str, Any]:
    from edgekd.export.stage import export_all

    r, task = ctx.recipe, ctx.task
    if not r.export.targets:
        raise StageError("export.targets is empty: name at least one target (e.g. --set 'export.targets=[onnx]').")
    t0 = time.perf_counter()
    src = source_stage(ctx)
    model = load_source(ctx)
    model_dir = ctx.model_dir(src)
    inputs, labels = ctx.parity_data(r.export.parity_examples)
    meta = {
        "task": task.name,
        "labels": task.label_names,
        **task.export_meta(),
        "source_model": str(model_dir),
        "source_stage": src,
        "run": r.name,
    }
    extra = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    records = export_all(task.export_module(model), task.model_io(), r.export.targets,
                         ctx.run.stage_dir("export"), r.export, inputs, labels, task.metrics, meta, extra,
                         task.agreement)
    records.update(ctx.extra_exports(model, inputs, labels, meta))
    folders = [Path(rec["folder"]) for rec in records.values() if rec.get("folder") and Path(rec["folder"]).exists()]
    ctx.run.record("export", export_fingerprint(ctx), {"targets": records, "source_stage": src}, folders,
                   seconds=time.perf_counter() - t0)
    return records


def bench_fingerprint(ctx: RunContext) -> str:
    parts = {"bench": ctx.recipe.bench.model_dump(mode="json"), "export": export_fingerprint(ctx),
             "eval": ctx.stage_fp("eval")}
    if getattr(ctx.recipe, "eval", None) is not None and ctx.recipe.eval.ood_dataset:
        parts["ood"] = [ctx.recipe.eval.ood_dataset, ctx.recipe.eval.ood_min_abs_score]
    if ctx.recipe.quantize.enabled:
        parts["quantize"] = ctx.stage_fp("quantize")
    return fingerprint(parts)


def run_bench(ctx: RunContext, profile: str | None = None) -> dict[str, Any]:
    from edgekd.devices.bench import bench_run

    r, task = ctx.recipe, ctx.task
    t0 = time.perf_counter()
    inputs, labels = ctx.parity_data(r.bench.eval_examples)
    torch_models = None
    if r.bench.torch_models:
        teacher = ctx.teacher_model()
        # the fp32 distilled student is the reference the compressed artifacts are judged against
        torch_models = {"student": (task.export_module(ctx.load_stage_model("distill")), task.model_io())}
        if source_stage(ctx) == "prune":
            torch_models["student-pruned"] = (task.export_module(load_source(ctx)), task.model_io())
        if teacher is not None:  # a black-box teacher has no weights here to time
            torch_models = {"teacher": (task.export_module(teacher), task.model_io()), **torch_models}
        if r.prune.enabled and r.prune.trim_vocab:
            # The inputs are the shipped (trimmed) tokenizer's ids; the unpruned models read the original ones.
            from edgekd.pruning.vocab import FromTrimmedIds, original_ids

            table = original_ids(ctx.shipped_tokenizer, ctx.tokenizer)
            torch_models = {k: ((FromTrimmedIds(m, table), io) if k != "student-pruned" else (m, io))
                            for k, (m, io) in torch_models.items()}
    ood = None
    if getattr(r, "eval", None) is not None and r.eval.ood_dataset:
        if task.name != "text-classification":
            raise StageError(f"eval.ood_dataset ({r.eval.ood_dataset}) is a text set; task '{task.name}' cannot be "
                             "scored on it. Set eval.ood_dataset to null in the recipe.")
        from edgekd.ood import ood_inputs

        found = ood_inputs(ctx, ctx.shipped_tokenizer)  # the ids the shipped artifacts read
        ood = (found[0].name, found[1], found[2]) if found else None
    result = bench_run(ctx.run.root, profile or r.bench.profile, r.bench, inputs, labels, task.metrics,
                       torch_models, metric=task.primary_metric, input_desc=ctx.input_desc(), ood=ood)
    ctx.run.record("bench", bench_fingerprint(ctx), result, seconds=time.perf_counter() - t0)
    return result
