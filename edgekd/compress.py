"""The compression stages of the pipeline: prune (with distillation to recover) and quantize.

Adapters from the run context to ``edgekd.pruning.prune_model`` and
``edgekd.quantization.quantize_onnx``: which model, which batches score importance, how recovery
trains, which examples calibrate and guard accuracy, and what goes into the manifest.
"""

from __future__ import annotations

import copy
import shutil
import time
from typing import Any

import numpy as np
import torch

from edgekd.context import RunContext
from edgekd.distill import load_student, stage_fingerprint
from edgekd.errors import StageError
from edgekd.losses import hidden_state_loss, soft_hard_loss
from edgekd.recipe import TrainConfig
from edgekd.runfolder import fingerprint
from edgekd.tasks.text import to_torch
from edgekd.train import predict, train


def prune_settings(cfg) -> dict[str, Any]:
    """The prune section as fingerprinted: keys added later are left out at their defaults (and an
    unset ``steps`` of a fixed target is its 1), so runs recorded before they existed stay valid."""
    from edgekd.recipe import PruneConfig

    d = cfg.model_dump(mode="json")
    for key in ("max_accuracy_drop", "recover_hidden_weight", "final_recover_epochs", "trim_vocab",
                "vocab_min_count", "vocab_keep_chars"):
        if d[key] == PruneConfig.model_fields[key].default:
            del d[key]
    if d["steps"] is None and cfg.target_latency_ms is None and cfg.max_accuracy_drop is None:
        d["steps"] = 1
    return d


def prune_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    return fingerprint({"prune": prune_settings(r.prune), "distill": stage_fingerprint(ctx, "distill"),
                        "seed": r.seed})


def load_pruned(ctx: RunContext):
    from edgekd.pruning import load_pruned_model

    _check_pruned(ctx)
    return load_pruned_model(ctx.model_dir("prune"))


def _check_pruned(ctx: RunContext) -> None:
    if not ctx.run.is_done("prune", prune_fingerprint(ctx)):
        raise StageError(f"The prune stage of run '{ctx.recipe.name}' is missing or out of date with the recipe. "
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
    from edgekd.teacher import load_teacher_outputs

    r, task, cfg = ctx.recipe, ctx.task, ctx.recipe.prune
    t0 = time.perf_counter()
    fp = prune_fingerprint(ctx)
    model = load_student(ctx, "distill")
    _, cached_logits = load_teacher_outputs(ctx)
    teacher_logits = torch.from_numpy(cached_logits)
    # Before trimming, the student reads the teacher's token ids: every split is tokenized with it here.
    tok = ctx.tokenizer
    train_data, val_data = ctx.tokenized("train", tok), ctx.tokenized("validation", tok)
    batches = train_data.train_batches(r.distill.train.batch_size, seed=r.seed)[: cfg.score_batches]
    score_batches = [
        {k: v for k, v in to_torch(train_data.collate(idx)).items() if k != "index"} for idx in batches
    ]
    # Hidden-state targets: the unpruned student, frozen (same width and depth as the pruned one).
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.recover_hidden_weight > 0 else None

    def evaluate(m) -> dict[str, float]:
        return task.metrics({"logits": predict(m, val_data, r.eval.batch_size, "prune: validation")},
                            val_data.labels)

    def recover_for(epochs: float, step: int, label: str):
        d = r.distill

        def loss_fn(mm, batch):
            want = reference is not None
            out = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=want)
            t = teacher_logits[batch["index"].cpu()].to(out.logits.device)
            loss, logs = soft_hard_loss(out.logits, t, batch["labels"], d.alpha, d.temperature, d.kl)
            if want:
                ref = reference.to(out.logits.device)
                with torch.no_grad():
                    ref_out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True)
                # Every layer's output (index 0 is the shared embedding output, left out).
                pairs = list(zip(out.hidden_states[1:], ref_out.hidden_states[1:], strict=True))
                hl = sum(hidden_state_loss(s, h, batch["attention_mask"], d.hidden_loss) for s, h in pairs) / len(pairs)
                loss = loss + cfg.recover_hidden_weight * hl
                logs["hidden"] = float(hl.detach())
            return loss, logs

        def run(m):
            tc = TrainConfig(**{**d.train.model_dump(), "epochs": epochs})
            ckpt = ctx.checkpoint_dir("prune", f"{fp}-{label}")
            train(m, train_data, tc, loss_fn, seed=r.seed + step, precision=r.runtime.precision,
                  ckpt_root=ckpt, description=f"prune: recover {label}")
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
                        recover=recover if cfg.recover_epochs > 0 else None, latency_fn=latency_fn,
                        recover_final=recover_for(cfg.final_recover_epochs, 1000, "final"),
                        metric=task.primary_metric)
    model, metrics = prune_model(model, cfg, pctx)
    say_search(ctx, cfg, metrics)
    out_tok = tok
    if cfg.trim_vocab:
        model, out_tok, metrics["vocab"] = _trim_vocab(ctx, model, train_data)
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


LATENCY_EXAMPLES = 32  # validation texts timed per search round (never test: the search selects on it)


def say_search(ctx: RunContext, cfg, metrics: dict[str, Any]) -> None:
    """Say plainly how a search ended, above all when its latency target was not met."""
    if "stopped" not in metrics:
        return
    steps = metrics["steps"]
    secs = sum(s.get("seconds", 0) for s in steps) + metrics.get("final_recovery", {}).get("seconds", 0)
    line = (f"prune: search kept round {metrics.get('kept_step', 0)} of {len(steps)} tried in {secs:.0f} s; "
            f"stopped: {metrics['stopped']}")
    if cfg.target_latency_ms is not None and not metrics["target_reached"]:
        lat = metrics.get("latency_ms_after")
        line += (f". [bold red]prune.target_latency_ms={cfg.target_latency_ms} was NOT met[/] (shipped form: "
                 f"{lat if lat is None else round(lat, 3)} ms); raise the target, lower the floors or "
                 "prune.max_accuracy_drop's strictness, or use a smaller student")
    ctx.say(line)


def _trim_vocab(ctx: RunContext, model, train_data) -> tuple[Any, Any, dict[str, Any]]:
    """Keep the tokens the training texts use; measure validation and test before and after."""
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

    before = scores(model, tok)
    vocab0 = model.get_input_embeddings().num_embeddings
    params0 = sum(p.numel() for p in model.parameters())
    keep = domain_token_ids(train_data.input_ids, tok, cfg.vocab_min_count, cfg.vocab_keep_chars)
    model, new_tok = trim_vocabulary(model, tok, keep)
    after = scores(model, new_tok)
    info = {"vocab_before": vocab0, "vocab_after": len(keep), "params_before": params0,
            "params_after": sum(p.numel() for p in model.parameters()), "min_count": cfg.vocab_min_count,
            "keep_chars": cfg.vocab_keep_chars, "before": before, "after": after}
    ctx.say(f"prune: vocabulary {vocab0} -> {len(keep)} tokens, parameters {params0} -> {info['params_after']}; "
            f"validation {task.primary_metric} {before['validation'][task.primary_metric]:.4f} -> "
            f"{after['validation'][task.primary_metric]:.4f}")
    return model, new_tok, info


def shipped_latency_fn(ctx, inputs: dict[str, np.ndarray]):
    """p50 latency (ms) of a model in the form that ships: exported to ONNX with the recipe's export
    options, quantized as the quantize section says (when it is enabled; without the accuracy
    guard, which may later keep a few operators in float), run with ONNX Runtime at batch 1 on
    ``inputs`` one row at a time at each row's real length (padding cut off by its attention mask)."""
    import tempfile
    from pathlib import Path

    from edgekd.export import get_exporter

    r = ctx.recipe
    io = ctx.task.model_io()
    threads = r.bench.threads or r.quantize.threads or r.runtime.threads
    n = len(next(iter(inputs.values())))
    rows = []
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if "attention_mask" in row:
            length = max(1, int(row["attention_mask"].sum()))
            row = {k: v[:, :length] if v.ndim == 2 else v for k, v in row.items()}
        rows.append(row)

    def latency(model) -> float:
        exporter = get_exporter("onnx")
        opts = dict(r.export.options.get("onnx", {}))
        with tempfile.TemporaryDirectory(prefix="edgekd-prune-latency-") as tmp:
            res = exporter.export(ctx.task.export_module(model), inputs, io, Path(tmp) / "fp32", **opts)
            path = Path(res.path)
            if r.quantize.enabled:
                path = _quantize_for_timing(r.quantize, path, Path(tmp) / "q", inputs)
            runner = exporter.load(path, threads=threads)
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


def _quantize_for_timing(qcfg, src, work, calib: dict[str, np.ndarray]):
    """``src`` quantized with the quantize section's method (what the quantize stage starts from)."""
    import onnx

    from edgekd.quantization.onnx_methods import make_method

    work.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(src), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in init]
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
              for i in graph.input if i.name in names}
    # Calibration ranges change accuracy, not speed: the few timing inputs calibrate, however many
    # quantize.calibration_samples asks for the shipped model.
    n = len(next(iter(calib.values())))
    method = make_method(qcfg.model_copy(update={"calibration_samples": min(qcfg.calibration_samples, n)}),
                         calib, names, dtypes, work, False)
    dst = work / "model.onnx"
    method.quantize(src, dst, [])
    return dst


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
