"""What every task family's prune stage shares: the prune section as fingerprinted, the p50 latency
of a model in the form that ships (for ``prune.target_latency_ms`` and the search), and how a
search's end is told."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from rich.markup import escape

from edgekd.context import RunContext

LATENCY_EXAMPLES = 32  # validation texts timed per search round (never test: the search selects on it)


def prune_settings(cfg) -> dict[str, Any]:
    """The prune section as fingerprinted: keys added later are left out at their defaults (and an
    unset ``steps`` of a fixed target is its 1), so runs recorded before they existed stay valid."""
    from edgekd.recipe import PruneConfig

    d = cfg.model_dump(mode="json")
    for key in ("max_accuracy_drop", "recover_hidden_weight", "final_recover_epochs", "trim_vocab",
                "vocab_min_count", "vocab_keep_chars", "vocab_keep_first", "quant_aware", "quant_aware_ranges",
                "recover_soft_targets", "recover_ema_decay", "recover_lr", "recover_soup", "score_loss",
                "hidden_size", "recover_fresh_copies", "recover_alpha", "recover_temperature"):
        if d[key] == PruneConfig.model_fields[key].default:
            del d[key]
    if d["steps"] is None and cfg.target_latency_ms is None and cfg.max_accuracy_drop is None:
        d["steps"] = 1
    if d["method"] == "unstructured":
        # Method unstructured ranked every layer together whatever prune.scope said until it read the
        # key; a folder pruned then is not the pruning its recorded scope now asks for.
        d["unstructured_reads_scope"] = True
    return d


# The quantize section's keys that shape the form a search times (``_quantize_for_timing``).
TIMED_FORM_KEYS = ("enabled", "method", "fuse", "smooth_alpha", "per_channel", "reduce_range", "weight_type",
                   "activation_type", "op_types", "embedding_bits", "embedding_block_size", "embedding_float_rows",
                   "preprocess")


def search_timing_settings(r) -> dict[str, Any]:
    """What a prune search's latencies depend on beyond the prune section (for the stage fingerprint): the
    quantize section's shape of the timed form, the ONNX export's options, and the bench profile and thread
    count it is timed at
    (``timing_place``). Empty without a search, so other runs keep their fingerprints."""
    if r.prune.target_latency_ms is None and r.prune.max_accuracy_drop is None:
        return {}
    q = r.quantize.model_dump(mode="json")
    timed_as = {k: q[k] for k in TIMED_FORM_KEYS}
    if q["unsigned_weights"] != "auto":  # added 2026-12-06: searches recorded before it keep their fingerprints
        timed_as["unsigned_weights"] = q["unsigned_weights"]
    onnx = r.export.options.get("onnx") or {}
    if onnx:  # the timed file is exported with them (optimize, opset...); added 2026-12-07, empty left out
        timed_as["export_options_onnx"] = onnx
    return {"timed_as": timed_as,
            "timed_at": {"profile": r.bench.profile, "threads": timing_place(r)[0]}}


def recovery_train_config(r, epochs: float):
    """The training settings of one recovery: the distill section's, for ``epochs`` epochs, with
    ``prune.recover_ema_decay`` and ``prune.recover_lr`` where they are set."""
    from edgekd.recipe import TrainConfig

    ema = r.prune.recover_ema_decay if r.prune.recover_ema_decay is not None else r.distill.train.ema_decay
    lr = r.prune.recover_lr if r.prune.recover_lr is not None else r.distill.train.lr
    return TrainConfig(**{**r.distill.train.model_dump(), "epochs": epochs, "ema_decay": ema, "lr": lr})


# How to let a search prune further, per prune method: the limits that stop its rounds, each in the direction
# that removes more (max_channel_ratio is the largest share of a layer's channels that may go: raised; the
# heads/neurons floors: lowered).
_FURTHER = {"channels": "raise prune.max_channel_ratio",
            "heads-ffn": "lower prune.min_heads_per_layer or min_neurons_fraction"}


def unmet_target_advice(method: str | None, max_accuracy_drop: float | None) -> str:
    """What to do about a latency target not met, the same in the prune stage's line and the bench's check:
    raise the target, or let the search prune further (each limit of ``method`` in the direction that removes
    more, and a budget loosened), or use a smaller student."""
    further = _FURTHER.get(method or "", "lower the floors")
    if max_accuracy_drop is not None:
        further += ", or raise prune.max_accuracy_drop"
    return f"raise the target, or prune further ({further}), or use a smaller student"


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
        line += (f". [bold red]prune.target_latency_ms={cfg.target_latency_ms} was NOT met[/] (timed form: "
                 f"{lat if lat is None else round(lat, 3)} ms); "
                 f"{unmet_target_advice(cfg.method, cfg.max_accuracy_drop)}")
    if metrics.get("latency_timed_form"):
        line += f". Rounds timed as {escape(metrics['latency_timed_form'])}"
        if metrics.get("latency_timed_on"):
            line += f", on {escape(metrics['latency_timed_on'])}"
    ctx.say(line)


def timing_place(r) -> tuple[int | None, str]:
    """(threads, where) for the search's latency: the bench profile's threads (``bench.threads``, else the
    profile's own, as ``edgekd bench`` times with), on this machine. A profile that is another device
    (ssh, or a phone's own tool) is not reached from a prune round: the search then times here at that
    profile's threads, and ``where`` says so."""
    from edgekd.devices.profiles import load_profile

    prof = load_profile(r.bench.profile)
    # The bench's own rule (edgekd.devices.bench): quantize.threads and runtime.threads, which time the
    # quantize stage and run torch, are not what the bench times the shipped file at.
    if prof.connection.kind == "local":
        threads = r.bench.threads or prof.bench_threads()
        return threads, f"this machine (bench profile '{prof.name}'), ONNX Runtime on {threads} thread(s)"
    if r.bench.threads or prof.threads or prof.cores:
        threads, whose = r.bench.threads or prof.bench_threads(), "at that profile's threads"
    else:  # the device's own core count is read on the device by `edgekd bench`, never from a prune round
        threads = os.cpu_count() or 1
        whose = "at this machine's cores, as the profile sets neither threads nor cores"
    return threads, (f"this machine, ONNX Runtime on {threads} thread(s) ({whose}): the bench profile "
                     f"'{prof.name}' is another device ({prof.connection.kind}), which a prune round does not "
                     "reach; `edgekd bench` gives its own figures")


def search_problems(r) -> list[str]:
    """The prune search's latency target where the code cannot honour it, for ``edgekd.recipe_check`` (both
    task families, before any stage runs). The search times each round as an ONNX file in ONNX Runtime
    (:func:`shipped_latency_fn`); where the run exports no ONNX (``exported_targets``: a command's one-off
    ``--to`` leaves the recipe's own targets in place) that is not the file that ships, so a latency target
    met on it says nothing about the shipped file. ``prune.max_accuracy_drop`` alone is honoured (its rounds
    stop on validation, not on a latency); its timings then say they are not the shipped file's."""
    p = r.prune
    if not p.enabled or p.target_latency_ms is None:
        return []
    if "onnx" in r.exported_targets():
        return []
    # (one message whatever a one-off --to adds, so that edgekd.api lays it on the recipe, not on the flag)
    return ["prune.target_latency_ms: the prune search times each round as an ONNX file in ONNX Runtime, and onnx "
            "is not in export.targets, so the search would meet the target on a file that does not ship: add onnx "
            "to export.targets, or drop prune.target_latency_ms (prune to prune.keep_params, or within "
            "prune.max_accuracy_drop) and check the shipped file's latency with `edgekd bench`"]


def timed_form(r) -> str:
    """Which form a search round times, in words (recorded as ``latency_timed_form``, said on the console):
    the float ONNX export, or the ONNX export quantized with the quantize section's own setup (as
    ``_quantize_for_timing`` makes it), which the quantize stage's guards may still not ship; and, where the
    run exports no ONNX, that no such file ships."""
    if r.quantize.enabled:
        from edgekd.quantization.onnx_stage import candidate_configs, candidate_name
        from edgekd.quantization.weight_encoding import device_of, settle

        settled, _ = settle(candidate_configs(r.quantize)[0][1], device_of(r.bench.profile))
        form = (f"the ONNX export quantized with the quantize section's own setup ({candidate_name(settled)}), "
                "which the quantize stage's accuracy and speed guards may still not ship (float, or a candidate, "
                "may ship instead)")
    else:
        form = "the fp32 ONNX export"
    opts = r.export.options.get("onnx") or {}
    if opts:
        form += f" (export.options.onnx {opts})"
    if "onnx" not in r.exported_targets():
        form += "; onnx is not in export.targets, so these times are not the shipped file's"
    return form


def shipped_latency_fn(ctx, inputs: dict[str, np.ndarray]):
    """p50 latency (ms) of a model in the form that ships: exported to ONNX with the recipe's export
    options, quantized as the quantize section says (when it is enabled; without the accuracy
    guard, which may later keep a few operators in float), run with ONNX Runtime at batch 1 on
    ``inputs`` one row at a time at each row's real length (padding cut off by its attention mask). Its
    ``where`` (:func:`timing_place`) and ``form`` (:func:`timed_form`) say where and what it times."""
    import tempfile
    from pathlib import Path

    from edgekd.export import get_exporter

    r = ctx.recipe
    io = ctx.task.model_io()
    threads, where = timing_place(r)
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
            module, _ = ctx.task.shipped_module(model, r.export, inputs)  # the form the export stage writes
            res = exporter.export(module, inputs, io, Path(tmp) / "fp32", **opts)
            path = Path(res.path)
            if r.quantize.enabled:
                path = _quantize_for_timing(r.quantize, path, Path(tmp) / "q", inputs, r.bench.profile)
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

    latency.where = where  # the prune stage records it beside the search's latencies
    latency.form = timed_form(r)  # and which form it timed (latency_timed_form)

    return latency


def _quantize_for_timing(qcfg, src, work, calib: dict[str, np.ndarray], profile: str = "local"):
    """``src`` quantized as the quantize section says: fused, smoothed and quantized with its method, its
    weights stored as they ship for the bench ``profile``'s device (what the quantize stage starts from;
    its candidates and guard come later)."""
    import onnx

    from edgekd.quantization.calibration import real_length_rows
    from edgekd.quantization.onnx_methods import make_method
    from edgekd.quantization.onnx_stage import candidate_configs, prepare_for_timing
    from edgekd.quantization.weight_encoding import device_of, settle

    work.mkdir(parents=True, exist_ok=True)
    section = candidate_configs(qcfg)[0][1]
    src = prepare_for_timing(src, work / "float", section, real_length_rows(calib) if section.smooth_alpha else [])
    graph = onnx.load(str(src), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in init]
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
              for i in graph.input if i.name in names}
    # Calibration ranges change accuracy, not speed: the few timing inputs calibrate, however many
    # quantize.calibration_samples asks for the shipped model.
    n = len(next(iter(calib.values())))
    # The weights stored as they ship for the run's device (quantize.unsigned_weights), timed here.
    settled, _ = settle(section, device_of(profile))
    method = make_method(settled.model_copy(update={"calibration_samples": min(qcfg.calibration_samples, n)}),
                         calib, names, dtypes, work, False)
    dst = work / "model.onnx"
    method.quantize(src, dst, [])
    return dst
