"""The compression stages of the pipeline: prune (with distillation to recover) and quantize.

Adapters from the run context to ``edgekd.pruning.prune_model`` and
``edgekd.quantization.quantize_onnx``: which model, which batches score importance, how recovery
trains, which examples calibrate and guard accuracy, and what goes into the manifest.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
import torch

from edgekd.context import RunContext
from edgekd.distill import load_student, stage_fingerprint
from edgekd.errors import StageError
from edgekd.losses import soft_hard_loss
from edgekd.recipe import TrainConfig
from edgekd.runfolder import fingerprint
from edgekd.tasks.text import to_torch
from edgekd.train import predict, train


def prune_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    return fingerprint({"prune": r.prune.model_dump(mode="json"), "distill": stage_fingerprint(ctx, "distill"),
                        "seed": r.seed})


def load_pruned(ctx: RunContext):
    from edgekd.pruning import load_pruned_model

    if not ctx.run.is_done("prune", prune_fingerprint(ctx)):
        raise StageError(f"The prune stage of run '{ctx.recipe.name}' is missing or out of date with the recipe. "
                         "Run `edgekd prune` (or `edgekd run`) first.")
    return load_pruned_model(ctx.model_dir("prune"))


def run_prune(ctx: RunContext) -> dict[str, Any]:
    from edgekd.pruning import PruneContext, prune_model
    from edgekd.teacher import load_teacher_outputs

    r, task, cfg = ctx.recipe, ctx.task, ctx.recipe.prune
    t0 = time.perf_counter()
    fp = prune_fingerprint(ctx)
    model = load_student(ctx, "distill")
    _, cached_logits = load_teacher_outputs(ctx)
    teacher_logits = torch.from_numpy(cached_logits)
    train_data, val_data = ctx.tokenized("train"), ctx.tokenized("validation")
    batches = train_data.train_batches(r.distill.train.batch_size, seed=r.seed)[: cfg.score_batches]
    score_batches = [
        {k: v for k, v in to_torch(train_data.collate(idx)).items() if k != "index"} for idx in batches
    ]

    def evaluate(m) -> dict[str, float]:
        return task.metrics({"logits": predict(m, val_data, r.eval.batch_size, "prune: validation")},
                            val_data.labels)

    def recover(m, step: int):
        d = r.distill

        def loss_fn(mm, batch):
            out = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            t = teacher_logits[batch["index"].cpu()].to(out.logits.device)
            return soft_hard_loss(out.logits, t, batch["labels"], d.alpha, d.temperature, d.kl)

        tc = TrainConfig(**{**d.train.model_dump(), "epochs": cfg.recover_epochs})
        train(m, train_data, tc, loss_fn, seed=r.seed + step, precision=r.runtime.precision,
              ckpt_root=ctx.checkpoint_dir("prune", f"{fp}-step{step}"), description=f"prune: recover step {step}")
        shutil.rmtree(ctx.checkpoint_dir("prune", f"{fp}-step{step}"), ignore_errors=True)
        return m

    latency_fn = _onnx_latency_fn(ctx) if cfg.target_latency_ms else None
    pctx = PruneContext(score_batches=score_batches, evaluate=evaluate,
                        recover=recover if cfg.recover_epochs > 0 else None, latency_fn=latency_fn)
    model, metrics = prune_model(model, cfg, pctx)
    out_dir = ctx.model_dir("prune")
    if ctx.is_main:
        task.save_model(model, ctx.tokenizer, out_dir)
        ctx.run.record("prune", fp, metrics, [out_dir], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics


def _onnx_latency_fn(ctx: RunContext):
    """p50 latency (ms, batch 1, real test examples) of a model exported to ONNX, as the edge would run it."""
    import tempfile
    from pathlib import Path

    from edgekd.export import get_exporter

    inputs, _ = ctx.parity_data(32)
    io = ctx.task.model_io()

    def latency(model) -> float:
        exporter = get_exporter("onnx")
        with tempfile.TemporaryDirectory(prefix="edgekd-prune-latency-") as tmp:
            res = exporter.export(ctx.task.export_module(model), inputs, io, Path(tmp))
            runner = exporter.load(res.path, threads=ctx.recipe.runtime.threads)
            rows = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(len(inputs["input_ids"]))]
            for row in rows[:5]:
                runner.run(row)
            times = []
            for _ in range(3):
                for row in rows:
                    s = time.perf_counter()
                    runner.run(row)
                    times.append(time.perf_counter() - s)
            return float(np.median(times) * 1000)

    return latency


def quantize_fingerprint(ctx: RunContext) -> str:
    from edgekd.deploy import export_fingerprint

    return fingerprint({"quantize": ctx.recipe.quantize.model_dump(mode="json"), "export": export_fingerprint(ctx)})


QUANT_SUFFIX = {"dynamic": "int8", "static": "int8-static", "fp16": "fp16"}


def run_quantize(ctx: RunContext) -> dict[str, Any]:
    from edgekd.quantization import quantize_onnx
    from edgekd.quantization.onnx_stage import candidate_configs

    task, cfg = ctx.task, ctx.recipe.quantize
    t0 = time.perf_counter()
    src = ctx.run.stage_dir("export") / "onnx"
    others = _quantize_other_targets(ctx)  # Core ML (quantize.coreml_mode) beside the ONNX path
    if not (src / "artifact.json").is_file():
        if others:
            ctx.run.record("quantize", quantize_fingerprint(ctx), {"targets": others}, [
                ctx.run.stage_dir("export") / n for n, r in others.items() if r.get("written", True)],
                seconds=time.perf_counter() - t0)
            return {"targets": others}
        raise StageError("quantize needs the ONNX (or Core ML) export: add onnx to export.targets and run "
                         "`edgekd export` first.")
    val_inputs, val_labels = ctx.validation_data()
    static = any(c.method == "static" for _, c in candidate_configs(cfg))
    calib = ctx.calibration_data(cfg.calibration_split, cfg.calibration_samples) if static else None
    out_dir = ctx.run.stage_dir("export") / f"onnx-{QUANT_SUFFIX[cfg.method]}"
    report = quantize_onnx(src, out_dir, cfg, calib, val_inputs, val_labels, task.metrics)
    # The metric of the quantized artifact on the test split, next to the float one (same runner as serving).
    from edgekd.export.parity import run_batched
    from edgekd.export.stage import load_artifact

    test_inputs, test_labels = ctx.parity_data()
    for name, folder in (("float", src), ("quantized", out_dir)):
        runner, _ = load_artifact(folder)
        report.setdefault("test", {})[name] = task.metrics(run_batched(runner.run, test_inputs, 64), test_labels)
    if others:
        report["targets"] = others
    ctx.run.record("quantize", quantize_fingerprint(ctx), report,
                   [out_dir] + [ctx.run.stage_dir("export") / n for n, r in others.items() if r.get("written", True)],
                   seconds=time.perf_counter() - t0)
    return report


def _quantize_other_targets(ctx: RunContext) -> dict[str, Any]:
    """Core ML weight compression of export/coreml into export/coreml-<mode>, when that export exists."""
    from edgekd.quantization.coreml import quantize_coreml_folder

    cfg, export = ctx.recipe.quantize, ctx.run.stage_dir("export")
    done: dict[str, Any] = {}
    if "coreml" in ctx.recipe.export.targets and (export / "coreml" / "artifact.json").is_file():
        suffix = "linear8" if cfg.coreml_mode == "linear8" else f"palettize{cfg.palette_bits}"
        test_inputs, _ = ctx.parity_data()
        try:
            done[f"coreml-{suffix}"] = quantize_coreml_folder(export / "coreml", export / f"coreml-{suffix}", cfg,
                                                              test_inputs)
        except StageError as e:  # recorded in the stage's report, not fatal to the ONNX path
            done[f"coreml-{suffix}"] = {"written": False, "reason": str(e)}
    return done
