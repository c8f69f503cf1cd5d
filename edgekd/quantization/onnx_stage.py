"""The ONNX quantize stage: quantize, guard accuracy (keeping sensitive operators in float), time
against the float model, and write an export folder that serves like any other.

Accuracy guard: the quantized model is scored on the validation examples. When ``guard_metric``
drops by more than ``max_accuracy_drop``, each candidate operator is in turn left in float while
everything else is quantized; the drop in output error (against the float model, on
``sensitivity_examples`` examples) ranks the operators. The worst 1, 2, 4, ... are kept in float
until the budget is met, ``max_attempts`` is used up or ``max_float_nodes`` is reached. If the
budget cannot be met, the report says so and recommends the float model.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import StageError, UnsupportedTargetError
from edgekd.export.base import ARTIFACT_META, RUNTIME_OPTIONS, read_artifact_meta, write_artifact_meta
from edgekd.export.timing import TUNING_RUNS, tune_session, unfuse_in_file
from edgekd.progress import progress_bar, track
from edgekd.quantization.calibration import n_rows, real_length_rows
from edgekd.quantization.guard import TIMING_BLOCK, Evaluator, MetricFn, choose_fastest, time_side_by_side
from edgekd.quantization.onnx_methods import make_method
from edgekd.quantization.weight_encoding import Device, encodings
from edgekd.recipe import SETUP_OF_SECTION, QuantizeConfig
from edgekd.runfolder import atomic_dir, sha256_file

log = logging.getLogger(__name__)

DEFAULT_FILE = "model.onnx"


def prepare(src: Path, dst: Path, preprocess: bool, external: bool = False) -> dict[str, Any]:
    """Write the model to quantize at ``dst``: pre-processed as ONNX Runtime recommends (symbolic
    shape inference, graph cleanup), every node named (exclusion goes by name)."""
    import onnx

    notes: dict[str, Any] = {"preprocess": None}
    staged = src
    if preprocess:
        pre = dst.with_name("pre.onnx")
        notes["preprocess"] = _pre_process(src, pre, external)
        if notes["preprocess"]["options"] is not None:
            staged = pre
    model = onnx.load(str(staged))
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    # torch.export graphs record the shape of every weight in value_info too. ONNX Runtime 1.30's
    # quantizer transposes a Gemm's weight into a MatMul's without updating that record, and its own
    # shape inference then fails ("Inferred shape and existing shape differ"). An initializer carries
    # its shape itself: drop the duplicate records.
    weights = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in weights]
    if len(kept) < len(model.graph.value_info):
        notes["dropped_weight_shape_records"] = len(model.graph.value_info) - len(kept)
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    onnx.save(model, str(dst), save_as_external_data=external)
    return notes


def _pre_process(src: Path, dst: Path, external: bool) -> dict[str, Any]:
    """ONNX Runtime's pre-processing, run as its command-line tool in the working folder: when
    symbolic shape inference does not finish, ONNX Runtime dumps the partial model (with all its
    weights) into the current directory, which must not be the user's. ``auto_merge`` lets it
    finish on torch.export graphs; without symbolic inference, ONNX shape inference still runs."""
    errors = []
    for flags in (["--auto_merge"], ["--skip_symbolic_shape"]):
        extra = ["--save_as_external_data", "--skip_optimization"] if external else []
        cmd = [sys.executable, "-m", "onnxruntime.quantization.preprocess", "--input", str(src.resolve()),
               "--output", str(dst.resolve()), *flags, *extra]
        proc = subprocess.run(cmd, cwd=dst.parent, capture_output=True, text=True, check=False)
        if proc.returncode == 0 and dst.is_file():
            return {"options": flags + extra, "retries": errors}
        last = (proc.stderr.strip().splitlines() or ["no output written"])[-1]
        errors.append(f"{' '.join(flags)}: {last[:300]}")
    return {"options": None, "failed": errors}


def _nodes(path: Path, op_types: frozenset[str]) -> list[tuple[str, str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node if n.op_type in op_types]


def _graph_inputs(path: Path) -> tuple[list[str], dict[str, Any]]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    return [i.name for i in inputs], {
        i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in inputs
    }


def _copy_model(model: Path, dst: Path, external: bool) -> None:
    if not external:
        shutil.copy2(model, dst)
        return
    import onnx

    # Re-save so the weights file is named after the destination, as the float folder's was.
    onnx.save(onnx.load(str(model)), str(dst), save_as_external_data=True, location=dst.name + ".data",
              size_threshold=0)


def _graph_notes(model: Path, source_notes: Mapping[str, Any] | None, external: bool) -> dict[str, Any]:
    """What artifact.json's ``notes`` says about the quantized graph itself (its opset, node count and
    weight bytes), never the float folder's figures; the float export's own notes are kept under
    ``source_notes`` (and its input ``bounds``, which the quantized graph keeps, at the top)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model), load_external_data=False)
    four_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    weight_bytes = 0
    for init in proto.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        weight_bytes += (count + 1) // 2 if init.data_type in four_bit else \
            count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    notes = {
        "exporter": "edgekd quantize (ONNX Runtime), from the float folder's export",
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": len(proto.graph.node),
        "external_data": external,
        "weight_bytes": weight_bytes,
        "source_notes": dict(source_notes or {}),
    }
    if "bounds" in (source_notes or {}):  # the input shapes it accepts are the float graph's (devices read them)
        notes["bounds"] = source_notes["bounds"]
    return notes


def _attempt_record(exclude: list[str], score: dict[str, Any], float_metric: float, budget: float) -> dict[str, Any]:
    drop = float_metric - score["metric"]
    return {"float_nodes": list(exclude), "metric": score["metric"], "drop": round(drop, 6),
            "relative_error": score.get("relative_error"), "passed": drop <= budget + 1e-12}


def candidate_configs(cfg: QuantizeConfig) -> list[tuple[str, QuantizeConfig]]:
    """The section's own setup, then each of ``cfg.candidates`` (unset keys inherited:
    ``QuantizeConfig.with_candidate``), named and without duplicates."""
    out: list[tuple[str, QuantizeConfig]] = []
    seen: list[QuantizeConfig] = []
    for cand in [None, *cfg.candidates]:
        # re-validated as one setup: the checks the section ran on every setup when the recipe loaded
        c = QuantizeConfig.model_validate(cfg.with_candidate(cand).model_dump(), context={SETUP_OF_SECTION: True})
        if c in seen:
            continue
        seen.append(c)
        name = candidate_name(c)
        taken = {n for n, _ in out}
        if name in taken:  # differs only in keys the name leaves out: each still timed and reported apart
            name = next(f"{name} ({k})" for k in range(2, len(out) + 3) if f"{name} ({k})" not in taken)
        out.append((name, c))
    return out


def device_setups(setups: list[tuple[str, QuantizeConfig]], device: Device | None
                  ) -> list[tuple[str, QuantizeConfig, str]]:
    """``(name, setup, why)`` for each way ``setups`` store their int8 weights for ``device``
    (``weight_encoding.encodings``): a setup built both ways has an unsigned twin named ``.../w-stored-u8``."""
    out = []
    for name, c in setups:
        choices, why = encodings(c, device)
        for unsigned in choices:
            twin = unsigned and len(choices) > 1
            out.append((f"{name}/w-stored-u8" if twin else name, c.model_copy(update={"unsigned_weights": unsigned}),
                        why))
    return out


def candidate_name(c: QuantizeConfig) -> str:
    parts = [c.method]
    if c.method == "static":
        parts.append(c.calibration_method + (f"{c.percentile:g}" if c.calibration_method == "percentile" else ""))
    if c.method != "fp16":
        parts += [p for p, on in (("per-channel", c.per_channel), ("reduce-range", c.reduce_range)) if on]
        if c.weight_type != "qint8":
            parts.append(f"w-{c.weight_type}")
        if c.unsigned_weights is not None and c.unsigned_weights != "auto":  # auto: settled per device later
            parts.append("w-stored-u8" if c.unsigned_weights else "w-stored-s8")
        if c.method == "static" and c.activation_type != "quint8":
            parts.append(f"a-{c.activation_type}")
        if c.op_types:
            parts.append("+".join(c.op_types))
        if c.embedding_bits == 4:
            parts.append(f"emb4-b{c.embedding_block_size}")
            if c.embedding_float_rows != QuantizeConfig.model_fields["embedding_float_rows"].default:
                parts[-1] += f"-float{c.embedding_float_rows}"
    if c.fuse != "none":
        parts.append(f"fused-{c.fuse}")
    if c.smooth_alpha is not None:
        parts.append(f"smooth{c.smooth_alpha:g}")
    return "/".join(parts)


def quantize_onnx(
    fp32_dir: Path,
    out_dir: Path | Callable[[str], Path],
    cfg: QuantizeConfig,
    calib_inputs: Mapping[str, np.ndarray] | None,
    val_inputs: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    metric_fn: MetricFn,
    device: Device | None = None,
) -> dict[str, Any]:
    """Quantize the ONNX export in ``fp32_dir`` into the export folder ``out_dir``, or, given a function of
    a method name, into the folder it gives for the chosen setup's method (the stage: export/onnx-int8 for a
    dynamic setup, whichever setup the section itself names); ``device`` (``weight_encoding.device_of``;
    None: this machine) decides how ``unsigned_weights: auto`` stores the int8 weights (``device_setups``).

    Every candidate setup (``candidate_configs``) goes through the accuracy guard; all are timed
    side by side with the float model at batch 1 on validation examples at their real lengths, and
    the fastest within the budget is written (``choose_fastest``). Returns the metrics and the
    guard report: float and quantized metrics, every attempt, the operators kept in float and why,
    the latencies, why each candidate was or was not chosen, and which model is recommended.
    """
    fp32_dir = Path(fp32_dir)
    folder_for = out_dir if callable(out_dir) else (lambda method, fixed=Path(out_dir): fixed)
    meta = read_artifact_meta(fp32_dir)
    src = fp32_dir / meta.get("file", DEFAULT_FILE)
    if not src.is_file():
        raise StageError(f"{src} does not exist: {fp32_dir} is not a complete ONNX export folder")
    if n_rows(val_inputs) != len(val_labels):
        raise StageError(f"{n_rows(val_inputs)} validation examples but {len(val_labels)} labels")
    external = any(p.name.startswith(src.name) and p != src for p in fp32_dir.iterdir())
    setups = device_setups(candidate_configs(cfg), device)

    with tempfile.TemporaryDirectory(prefix="edgekd-quant-") as work_str:
        work = Path(work_str)
        ev = Evaluator(val_inputs, val_labels, metric_fn, cfg.guard_metric, cfg.sensitivity_examples, cfg.threads)
        base = ev.score(src)  # first: a wrong guard_metric or input fails before any work
        ev.reference = base["outputs"]
        names, dtypes = _graph_inputs(src)
        exported = src
        if not external:
            from edgekd.export.timing import write_residual_sums_as_adds

            # The export wrote its residual Adds as Sum when its session was faster unfused: the candidates
            # start from the graph as exported (the fusions look for Add), and this stage times its own file.
            if write_residual_sums_as_adds(src, work / "exported-adds.onnx"):
                exported = work / "exported-adds.onnx"
        floats: dict[tuple[str, float | None], tuple[Path, dict[str, Any]]] = {}  # (fuse, smoothing) -> (model, notes)
        calib_rows = real_length_rows(calib_inputs, cfg.calibration_samples) if calib_inputs is not None else []
        results = []
        not_built: list[dict[str, str]] = []  # extra candidates whose fusion cannot apply to this graph
        for i, (name, c, encoding) in enumerate(track(setups, "quantize: candidates", label=lambda s: s[0])):
            key = (c.fuse, c.smooth_alpha)
            if key not in floats:
                try:
                    floats[key] = _prepare_float(exported, work, c, external, ev, calib_rows)
                except (UnsupportedTargetError, StageError) as e:
                    if i == 0:  # the section's own setup: the recipe asked for it, so it is an error
                        raise
                    # a setup from quantize.candidates: the others still compete; the report and the
                    # console say this one was not built and why
                    not_built.append({"name": name, "why": f"not built: {e}"})
                    log.warning("quantize: candidate %s not built: %s", name, e)
                    continue
            prepared, notes = floats[key]
            cwork = work / f"candidate{i}"  # own calibration cache: ranges depend on graph and method
            cwork.mkdir()
            try:
                method = make_method(c, calib_inputs, names, dtypes, cwork, external)
                guard, model, final = _accuracy_guard(method, prepared, cwork, ev, base, c)
            except (UnsupportedTargetError, StageError) as e:
                if i == 0:
                    raise
                not_built.append({"name": name, "why": f"not built: {e}"})  # the others still compete
                log.warning("quantize: candidate %s not built: %s", name, e)
                continue
            results.append({"name": name, "cfg": c, "method": method, "notes": notes, "guard": guard,
                            "model": model, "final": final, "encoding": encoding})

        rows = real_length_rows(val_inputs, cfg.speed_runs)
        float_opts = dict(meta.get(RUNTIME_OPTIONS) or {})  # the float folder's own session, as it ships
        timed: dict[str, Any] = {"float": (src, float_opts)}
        for fuse in dict.fromkeys(f for f, _ in floats):  # what the fusions alone give
            if fuse != "none":
                timed[f"float/fused-{fuse}"] = work / f"fused-{fuse}.onnx"
        timed.update({r["name"]: r["model"] for r in results})
        with progress_bar("quantize: timing float and quantized side by side", total=1) as bar:
            speed = time_side_by_side(timed, rows, cfg.speed_runs, cfg.threads)
            bar.advance()
        table = [{"name": r["name"], "passed": r["guard"]["passed"], "drop": r["guard"]["drop"],
                  "metric": r["guard"]["quantized_metric"], "p50_ms": speed[r["name"]]["p50_ms"]}
                 for r in results]
        best, why = choose_fastest(table, cfg.max_accuracy_drop, ceiling=speed["float"]["p50_ms"])
        chosen = best if best is not None else min(
            range(len(results)), key=lambda i: (results[i]["guard"]["drop"], table[i]["p50_ms"]))
        win = results[chosen]
        out_dir = Path(folder_for(win["cfg"].method))  # named after the setup that is written, not the section
        session, final = _tune_session(win, ev, base, val_inputs, cfg)
        report: dict[str, Any] = {"method": win["cfg"].method, "candidate": win["name"], **win["notes"]}
        if exported != src:
            report["residual_sums_as_adds"] = True
        report["precision"] = win["method"].precision
        report["settings"] = {**win["method"].settings(), "fuse": win["cfg"].fuse}
        if win["cfg"].method != "fp16":
            report["settings"]["unsigned_weights_why"] = win["encoding"]
        report["accuracy_guard"] = win["guard"]
        report["speed_guard"] = _speed_guard(speed, win["name"], rows, cfg, win["method"].precision,
                                             _ranking_session(float_opts))
        if session["runtime_options"]:
            # The candidates were ranked in ONNX Runtime's default session; the winner ships in another. The
            # verdict against float reads the two timed again side by side, each in the session it ships with.
            again = time_side_by_side({"float": (src, float_opts), win["name"]: (win["model"], session["runtime_options"])},
                                      rows, cfg.speed_runs, cfg.threads)
            guard = report["speed_guard"]  # "all" stays the ranking's timing of every model
            shipped = ("float and the chosen model each in the session it ships with (the float folder's, "
                       "the tuned one), timed again side by side after the session was tuned")
            verdict = _speed_guard(again, win["name"], rows, cfg, win["method"].precision, shipped)
            guard["ranking"] = {k: guard[k] for k in ("session", "float", "quantized", "speedup")}
            guard.pop("note", None)
            guard.update({k: verdict[k] for k in ("float", "quantized", "speedup", "quantized_faster", "note")
                          if k in verdict})
            guard["session"] = shipped
        report["candidates"] = [
            {**t, "settings": {**r["method"].settings(), "fuse": r["cfg"].fuse},
             "float_nodes": r["guard"]["attempts"][-1]["float_nodes"] if not r["guard"]["passed"] else
             [n["node"] for n in r["guard"]["float_nodes"]],
             "size_bytes": _model_bytes(r["model"]), "chosen": i == best, "why": why[i]}
            for i, (t, r) in enumerate(zip(table, results, strict=True))
        ]
        if not_built:
            report["candidates_not_built"] = not_built
        report["float"] = {"metrics": base["metrics"], "size_bytes": _model_bytes(src), "sha256": meta.get("sha256")}
        report["session"] = session
        report["quantized"] = {"metrics": final["metrics"], "size_bytes": _model_bytes(win["model"]),
                               "max_abs_diff": final["max_abs_diff"], "top1_agreement": final["top1_agreement"]}
        use_quantized = win["guard"]["passed"] and report["speed_guard"]["quantized_faster"]
        reasons = [] if use_quantized else [
            n for n in (win["guard"].get("note"), report["speed_guard"].get("note")) if n
        ]
        report.update(recommended="quantized" if use_quantized else "float",
                      recommended_dir=str(out_dir if use_quantized else fp32_dir), reasons=reasons)
        _write_folder(fp32_dir, out_dir, src, win["model"], meta, report, win["method"].precision, external)
    report["quantized"]["sha256"] = sha256_file(out_dir / src.name)
    report["out_dir"] = str(out_dir)
    return report


def _tune_session(win: dict[str, Any], ev: Evaluator, base: dict[str, Any], val_inputs: Mapping[str, np.ndarray],
                  cfg: QuantizeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The session options the written folder keeps (``tune_session`` on validation rows) and the
    chosen model's score under them: a faster session that would leave the accuracy budget is not kept.
    When the unfused session is kept, the model's residual Adds are also written as Sum
    (``unfuse_in_file``), so a session that does not read artifact.json runs it unfused too."""
    rows = real_length_rows(val_inputs, TUNING_RUNS)
    session = tune_session(win["model"], rows, max(cfg.speed_runs, TUNING_RUNS), cfg.threads)
    if not session["runtime_options"]:
        return session, win["final"]
    tuned = ev.score(win["model"], precision=win["method"].precision, options=session["runtime_options"])
    session["tuning"]["validation_metric"] = tuned["metric"]
    if win["guard"]["passed"] and base["metric"] - tuned["metric"] > cfg.max_accuracy_drop:
        session["tuning"]["note"] = (f"kept the default session: without the fusion the validation {cfg.guard_metric} "
                                     f"is {tuned['metric']:.4f}, outside the budget")
        session["runtime_options"] = {}
        return session, win["final"]
    # kept only when ONNX Runtime's default session answers every validation example, one at a time at its
    # own length, exactly as the tuned session did
    session["tuning"]["residual_adds_as_sum"] = unfuse_in_file(Path(win["model"]), real_length_rows(val_inputs),
                                                               session["runtime_options"])
    return session, tuned


def _prepare_float(src: Path, work: Path, c: QuantizeConfig, external: bool, ev: Evaluator | None,
                   calib_rows: list[dict[str, np.ndarray]]) -> tuple[Path, dict[str, Any]]:
    """The float model a candidate quantizes: fused first unless ``c.fuse`` is none, then pre-processed
    and with every node named, then smoothed with ``c.smooth_alpha`` (``edgekd.quantization.smooth``,
    calibrated on ``calib_rows``). With ``ev``, the fused and the smoothed models are each checked
    against the source model's validation outputs (the stage); without, they are not (timing only).
    A fusion another candidate made in ``work`` is reused, with its notes."""
    notes: dict[str, Any] = {}
    staged = src
    if c.fuse != "none":
        fused = work / f"fused-{c.fuse}.onnx"
        record = fused.with_suffix(".json")
        if fused.is_file() and record.is_file():
            notes["fusion"] = json.loads(record.read_text())
        else:
            from edgekd.export.onnx import fuse_file

            notes["fusion"] = fuse_file(staged, fused, external, attention=c.fuse)
            if ev is not None:
                notes["fusion"]["parity"] = _checked(ev, fused, "fused", "set quantize.fuse: none")
            record.write_text(json.dumps(notes["fusion"], default=str))
        staged = fused
    prepared = work / (f"float-{c.fuse}" + (f"-smooth{c.smooth_alpha:g}" if c.smooth_alpha is not None else "")) / "float.onnx"
    prepared.parent.mkdir()
    notes.update(prepare(staged, prepared, c.preprocess, external))
    if c.smooth_alpha is not None:
        from edgekd.quantization.smooth import smooth_file

        if not calib_rows:
            raise StageError("quantize.smooth_alpha calibrates the channel ranges on real examples: none were given")
        notes["smoothing"] = smooth_file(prepared, prepared, calib_rows, c.smooth_alpha, c.threads, external)
        if ev is not None:
            notes["smoothing"]["parity"] = _checked(ev, prepared, "smoothed", "drop quantize.smooth_alpha")
    return prepared, notes


def _checked(ev: Evaluator, path: Path, what: str, remedy: str) -> dict[str, float]:
    """``path`` scored against the source model on validation; a rewrite that changes answers is an error."""
    check = ev.score(path)
    if check["top1_agreement"] < 0.999:
        raise StageError(f"the {what} float model agrees with the exported one on only {check['top1_agreement']:.2%} "
                         f"of the validation examples (max abs diff {check['max_abs_diff']:.3g}): {remedy}")
    return {"max_abs_diff": check["max_abs_diff"], "top1_agreement": check["top1_agreement"]}


def prepare_for_timing(src: Path, work: Path, c: QuantizeConfig,
                       calib_rows: list[dict[str, np.ndarray]]) -> Path:
    """The float model ``c`` quantizes, as the stage prepares it (fused, pre-processed, smoothed), for a
    caller that times the quantized form (the prune search); no parity check."""
    work.mkdir(parents=True, exist_ok=True)
    return _prepare_float(src, work, c, False, None, calib_rows)[0]


def _model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _accuracy_guard(method: Any, prepared: Path, work: Path, ev: Evaluator, base: dict[str, Any],
                    cfg: QuantizeConfig) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Quantize; while the metric drops too far, keep the 1, 2, 4, ... most sensitive operators in
    float. Returns the guard report, the chosen model and its score."""
    attempts: list[dict[str, Any]] = []
    paths: list[Path] = []
    scores: list[dict[str, Any]] = []

    def attempt(exclude: list[str]) -> None:
        path = work / f"attempt{len(paths) + 1}.onnx"
        method.quantize(prepared, path, exclude)
        scores.append(ev.score(path, precision=method.precision))
        attempts.append(_attempt_record(exclude, scores[-1], base["metric"], cfg.max_accuracy_drop))
        paths.append(path)

    attempt([])
    ranking: list[dict[str, Any]] = []
    if not attempts[0]["passed"] and cfg.max_attempts > 1 and cfg.max_float_nodes > 0:
        ranking = _sensitivity(method, prepared, work, ev)
        useful = [r["node"] for r in ranking if r["error_removed"] > 0][: cfg.max_float_nodes]
        k = 1
        while not attempts[-1]["passed"] and len(attempts) < cfg.max_attempts and useful:
            exclude = useful[:k]
            if exclude != attempts[-1]["float_nodes"]:
                attempt(exclude)
            if k >= len(useful):
                break
            k *= 2

    best = next((i for i, a in enumerate(attempts) if a["passed"]), None)
    passed = best is not None
    if best is None:  # report the least bad attempt; the float model is recommended
        best = min(range(len(attempts)), key=lambda i: (attempts[i]["drop"], len(attempts[i]["float_nodes"])))
    by_node = {r["node"]: r for r in ranking}
    guard = {
        "metric": cfg.guard_metric, "budget": cfg.max_accuracy_drop, "passed": passed,
        "float_metric": base["metric"], "quantized_metric": scores[best]["metric"],
        "drop": round(base["metric"] - scores[best]["metric"], 6), "attempts": attempts,
        "float_nodes": [by_node.get(n, {"node": n}) for n in attempts[best]["float_nodes"]],
        "sensitivity_candidates": len(ranking), "sensitivity": ranking[:20],
    }
    if not passed:
        guard["note"] = (
            f"the {cfg.guard_metric} drop stays above {cfg.max_accuracy_drop} after {len(attempts)} "
            f"attempt(s) keeping up to {max(len(a['float_nodes']) for a in attempts)} operator(s) in float; "
            "the float model is recommended"
        )
    return guard, paths[best], scores[best]


def _ranking_session(float_opts: Mapping[str, Any]) -> str:
    """How the candidates' ranking timed each model: the float model in its folder's own session (the
    runtime options it ships with, when it has any), every other model in ONNX Runtime's default one."""
    default = "ONNX Runtime's default optimisers"
    if not float_opts:
        return f"{default} for every model (the written folder's own: report session)"
    return (f"the float model in the session its folder ships with (runtime_options "
            f"{json.dumps(dict(float_opts), sort_keys=True, default=str)}), every other model with {default} "
            "(the written folder's own: report session)")


def _timed_inputs(rows: list[dict[str, np.ndarray]]) -> str:
    """The timed inputs in words: their real lengths (the attention mask's, each row cut to it) where rows
    have one; none for inputs without one (an image's second axis is its channels, not a length)."""
    said = f"{len(rows)} validation examples, one at a time"
    masks = [r.get("attention_mask") for r in rows]
    if not rows or any(m is None or np.ndim(m) != 2 for m in masks):
        return said
    lengths = [int(np.shape(m)[1]) for m in masks]
    return f"{said} at their real lengths ({min(lengths)}-{max(lengths)}, median {int(np.median(lengths))})"


def _speed_guard(speed: dict[str, dict[str, float]], name: str, rows: list[dict[str, np.ndarray]],
                 cfg: QuantizeConfig, precision: str, session: str) -> dict[str, Any]:
    report = {"batch": 1, "threads": cfg.threads, "thread_spinning": True, "block": TIMING_BLOCK,
              "session": session, "inputs": _timed_inputs(rows),
              "all": speed, "float": speed["float"], "quantized": speed[name]}
    faster = report["quantized"]["p50_ms"] < report["float"]["p50_ms"]
    report.update(speedup=round(report["float"]["p50_ms"] / report["quantized"]["p50_ms"], 3), quantized_faster=faster)
    if not faster:
        report["note"] = (f"{precision} is not faster than float here ({report['quantized']['p50_ms']:.3f} ms "
                          f"vs {speed['float']['p50_ms']:.3f} ms p50 at batch 1)")
    return report


def _sensitivity(method: Any, prepared: Path, work: Path, ev: Evaluator) -> list[dict[str, Any]]:
    """For each candidate operator: quantize everything else and measure how much output error
    (and metric) that removes, on the sensitivity subset. Sorted, most sensitive first."""
    full = work / "sens-all.onnx"
    method.quantize(prepared, full, [])
    everything = ev.score(full, subset=True, precision=method.precision)
    ranking = []
    for node, op in track(_nodes(prepared, method.candidate_ops), "quantize: sensitivity", label=lambda n: n[0]):
        path = work / "sens-one.onnx"
        method.quantize(prepared, path, [node])
        s = ev.score(path, subset=True, precision=method.precision)
        ranking.append({
            "node": node, "op_type": op,
            "error_removed": round(everything["relative_error"] - s["relative_error"], 9),
            "relative_error_without": s["relative_error"],
            "metric_recovered": round(s["metric"] - everything["metric"], 6),
        })
    ranking.sort(key=lambda r: (-r["error_removed"], r["node"]))
    return ranking


def _write_folder(fp32_dir: Path, out_dir: Path, src: Path, model: Path, meta: dict[str, Any],
                  report: dict[str, Any], precision: str, external: bool) -> None:
    """The float folder's other files (tokenizer, labels) plus the quantized model and its artifact.json."""
    with atomic_dir(out_dir) as tmp:
        for item in fp32_dir.iterdir():
            if item.name == ARTIFACT_META or item.name.startswith(src.name) or item.name.startswith("."):
                continue  # the float model (and its external data) is replaced below
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        _copy_model(model, tmp / src.name, external)
        from edgekd.export.stage import artifact_digest

        new = dict(meta)
        # Every file the artifact consists of gets the quantized copy's digest (the server checks them all).
        listed = [n for n in (meta.get("files") or {}) if (tmp / n).exists()] or [src.name]
        new.update(
            target=out_dir.name, exporter="onnx", file=src.name, precision=precision,
            files={n: artifact_digest(tmp / n) for n in listed},
            sha256=sha256_file(tmp / src.name), size_bytes=(tmp / src.name).stat().st_size,
            source={"folder": str(fp32_dir), "sha256": meta.get("sha256"), "precision": meta.get("precision")},
            notes=_graph_notes(tmp / src.name, meta.get("notes"), external),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            parity={"reference": "float ONNX model", "max_abs_diff": report["quantized"]["max_abs_diff"],
                    "top1_agreement": report["quantized"]["top1_agreement"]},
            quantization={
                "method": report["method"], "settings": report["settings"],
                "float_nodes": [n["node"] for n in report["accuracy_guard"]["float_nodes"]],
                "accuracy_guard": {k: report["accuracy_guard"][k] for k in ("metric", "budget", "passed", "float_metric", "quantized_metric", "drop")},
                "speedup_batch1": report["speed_guard"]["speedup"], "recommended": report["recommended"],
            },
        )
        # This folder's own session choice, never the float folder's (copied in with ``meta``).
        new[RUNTIME_OPTIONS], new["session_tuning"] = report["session"]["runtime_options"], report["session"]["tuning"]
        write_artifact_meta(tmp, new)
