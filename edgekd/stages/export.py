"""The export stage (and its parity checks), the same for every task family.

A thin adapter from the run context to ``edgekd.export.stage.export_all``: which model is the
source, which examples are real, which figures go into the manifest; the task supplies the export
module, its inputs and outputs, the metric and the parity agreement.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekd.context import RunContext
from edgekd.errors import StageError
from edgekd.runfolder import fingerprint, sha256_file
from edgekd.stages.base import load_stage_model, source_stage_of, stage_fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def source_stage(ctx: RunContext) -> str:
    """The model that ships: the pruned student when the recipe prunes, else the distilled one."""
    return source_stage_of(ctx.recipe)


def _source_fingerprint(ctx: RunContext) -> str:
    return stage_fingerprint(ctx, source_stage(ctx))


def load_source(ctx: RunContext):
    return load_stage_model(ctx, source_stage(ctx))


# Export keys that only a task's shipped_module reads. A task that does not read one (its
# ``shipped_settings`` leaves it out) keeps its fingerprint while the key is unset.
SHIPPED_KEYS = ("first_token_last_layer",)


def export_fingerprint(ctx: RunContext) -> str:
    export = ctx.recipe.export.model_dump(mode="json")
    read = getattr(ctx.task, "shipped_settings", ())
    for key in SHIPPED_KEYS:
        if key not in read and export[key] is None:
            del export[key]
    parts = {"export": export, "source": _source_fingerprint(ctx), "data": ctx.data_fingerprint}
    # Keys of the family's own section that its exports read (a detection context's ``export_settings``:
    # detection.nms_in_graph, conf_threshold, iou_threshold, max_det). A family without any (text) keeps
    # the fingerprint it had before they were hashed.
    own = getattr(ctx, "export_settings", None)
    if own:
        parts["family"] = own
    coreml = coreml_bench_batch_sizes(ctx.recipe)
    if coreml is not None:  # the bench's batch sizes, when they are not the package's own default
        parts["coreml_batch_sizes"] = coreml
    e = ctx.recipe.export
    qdq = (e.options.get("tensorrt") or {}).get("qdq_onnx") if "tensorrt" in e.targets else None
    if qdq and Path(qdq).is_file():  # the Q/DQ model's contents, not only its path: one quantized again re-exports
        parts["tensorrt_qdq_sha256"] = sha256_file(qdq)
    if "coreml" in e.targets and e.first_token_last_layer is not False and "first_token_last_layer" in read:
        # Since 2026-12-07 the first-position module masks padded keys with -1e4, not float32's lowest value,
        # which Core ML's fp16 conversion made -inf (NaN logits): a run exporting Core ML exports again.
        parts["first_token_mask"] = "-1e4"
    return fingerprint(parts)


def coreml_bench_batch_sizes(recipe: Any) -> list[int] | None:
    """The batch sizes a Core ML package enumerates for the bench (``bench.batch_sizes`` up to its
    ``max_batch``), so that each size the bench times is a shape planned for the Neural Engine rather than a
    smaller batch padded up to the next one; None where export.options.coreml.batch_sizes chooses them, or
    where they are the exporter's own default (runs exported before the bench's were passed keep theirs)."""
    from edgekd.export._common import DEFAULT_MAX_BATCH
    from edgekd.export.coreml import DEFAULT_BATCH_SIZES

    given = recipe.export.options.get("coreml") or {}
    if "coreml" not in recipe.export.targets or "batch_sizes" in given:
        return None
    max_batch = given.get("max_batch", DEFAULT_MAX_BATCH)
    max_batch = max_batch if isinstance(max_batch, int) and not isinstance(max_batch, bool) else DEFAULT_MAX_BATCH
    sizes = sorted({b for b in recipe.bench.batch_sizes if b <= max_batch})
    return None if sizes == sorted(b for b in DEFAULT_BATCH_SIZES if b <= max_batch) else sizes


def export_defaults(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Option defaults by target that the recipe's export.options override: the task's own, and a Core ML
    package's batch sizes from the bench (``coreml_bench_batch_sizes``)."""
    defaults = {k: dict(v) for k, v in (getattr(ctx.task, "export_defaults", None) or {}).items()}
    sizes = coreml_bench_batch_sizes(ctx.recipe)
    if sizes is not None:
        defaults.setdefault("coreml", {})["batch_sizes"] = sizes
    return defaults


def run_export(ctx: RunContext) -> dict[str, Any]:
    from edgekd.errors import ParityError
    from edgekd.export.stage import Staging, export_all

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
    # Every target captures the shipped module; parity compares each artifact with the model's own forward.
    shipped, graph = task.shipped_module(model, r.export, inputs)
    meta.update(graph)
    # The ONNX folder's session options are chosen by timing on validation examples (never test).
    timing = ctx.validation_data()[0] if "onnx" in r.export.targets else None
    # Every folder of this stage (export.targets and the family's extra exports) is staged first and published
    # together once all are made: a stage that stops part-way leaves the earlier export whole, as the
    # manifest records it, never folders of two models side by side.
    staging = Staging(ctx.run.stage_dir("export"))
    error: Exception | None = None
    try:
        try:
            records = export_all(shipped, task.model_io(), r.export.targets,
                                 ctx.run.stage_dir("export"), r.export, inputs, labels, task.metrics, meta, extra,
                                 task.agreement, export_defaults(ctx), reference=task.export_module(model),
                                 timing_inputs=timing, staging=staging)
        except ParityError as failed:
            if getattr(failed, "records", None) is None:  # not a threshold miss: nothing to publish
                raise
            # A threshold miss: the folders are made, marked failed for inspection; the family's extra exports of
            # this model are made all the same, so no folder of an earlier model stays beside this run's.
            records, error = failed.records, _with_extra_exports(ctx, failed, model, inputs, labels, meta, staging)
        else:
            try:
                records.update(ctx.extra_exports(model, inputs, labels, meta, staging=staging))
            except ParityError as miss:  # the extra export's own threshold miss: its folder stays, marked failed
                if getattr(miss, "records", None) is None:
                    raise
                error = miss
    except BaseException:
        staging.discard()
        raise
    staging.publish()
    if error is not None:
        raise error
    folders = [Path(rec["folder"]) for rec in records.values() if rec.get("folder") and Path(rec["folder"]).exists()]
    ctx.run.record("export", export_fingerprint(ctx), {"targets": records, "source_stage": src}, folders,
                   seconds=time.perf_counter() - t0)
    return records


def _with_extra_exports(ctx: RunContext, failed: Exception, model: Any, inputs: Any, labels: Any,
                        meta: dict[str, Any], staging: Any) -> Exception:
    """``failed`` (export_all's threshold miss) after the extra exports ran: their records join its
    ``records``, and their own parity miss joins its message. An extra export that cannot be made raises
    (the stage then publishes nothing)."""
    from edgekd.errors import ParityError

    try:
        extra = ctx.extra_exports(model, inputs, labels, meta, staging=staging)
    except ParityError as miss:  # the extra export's own threshold miss: its folder stays, marked failed
        extra = getattr(miss, "records", None)
        if extra is None:  # it could not be made: the stage stops, publishing nothing
            raise
        combined = ParityError(f"{failed} | {miss}")
        combined.records = {**(getattr(failed, "records", None) or {}), **extra}  # type: ignore[attr-defined]
        return combined
    failed.records.update(extra)  # type: ignore[attr-defined]
    return failed
