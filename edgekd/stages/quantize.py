"""The quantize stage: post-training quantization of the ONNX export (and Core ML weight
compression beside it), under the accuracy and speed guards of ``edgekd.quantization``. Nothing in
it is task-specific: the context supplies the calibration, validation and test examples and the
task the metric."""

from __future__ import annotations

import re
import string
import time
from pathlib import Path
from typing import Any

from edgekd.context import RunContext
from edgekd.errors import StageError
from edgekd.export.base import quantized_folder
from edgekd.runfolder import fingerprint
from edgekd.stages.export import export_fingerprint


def quantize_fingerprint(ctx: RunContext) -> str:
    q = ctx.recipe.quantize
    parts = {"quantize": quantize_settings(q), "export": export_fingerprint(ctx)}
    if "dynamic" in {q.method, *((c.method or q.method) for c in q.candidates)}:
        # Since 2026-12-03 a dynamic-int8 model is scored one text per call at its own length, as it is
        # served (guard, test figures, bench): a run that has one quantizes and benches again; other
        # runs keep their fingerprints.
        parts["int8_dynamic_scored"] = "one row per call at its own length"
    if 4 in {q.embedding_bits, *(c.embedding_bits for c in q.candidates)}:
        # Since 2026-12-04 the 4-bit tables are stored uint8-packed (same answers, faster gathers): a run
        # with 4-bit embeddings quantizes and benches again.
        parts["embedding_4bit_storage"] = "uint8, two values per byte"
        rows = {c.embedding_float_rows if c.embedding_float_rows is not None else q.embedding_float_rows
                for c in q.candidates if (c.embedding_bits or q.embedding_bits) == 4}
        if q.embedding_bits == 4:
            rows.add(q.embedding_float_rows)
        if any(rows):
            # Since 2026-12-05 those small tables keep their own float values instead of their 4-bit
            # values decoded: a run with them quantizes and benches again.
            parts["embedding_small_tables"] = "float32, the model's own values"
    stored = unsigned_setups(ctx)
    if stored:
        # Since 2026-12-06 int8 weights may be stored unsigned for an x86 device without VNNI (same numbers,
        # no saturating u8s8 kernel): a run for such a device quantizes and benches again; others keep theirs.
        parts["int8_weights_unsigned"] = stored
    if "packed" in {q.fuse, *(c.fuse for c in q.candidates)}:
        # Since 2026-12-04 packing also turns the first-token last block into a MultiHeadAttention.
        parts["packed_attention"] = "Attention per full block, MultiHeadAttention per first-token block"
    if calibrates(q):
        # Since 2026-12-07 the calibration examples are a seeded sample of their split (stratified by label for
        # text), not its first rows in file order: a run that calibrates (static, smooth_alpha) quantizes and
        # benches again; others keep their fingerprints.
        parts["calibration_rows"] = "seeded sample, stratified by label where examples have one"
    return fingerprint(parts)


def calibrates(cfg) -> bool:
    """Whether a setup of the quantize section ``cfg`` reads calibration examples (static, smooth_alpha)."""
    from edgekd.quantization.onnx_stage import candidate_configs

    return any(c.method == "static" or c.smooth_alpha is not None for _, c in candidate_configs(cfg))


def unsigned_setups(ctx: RunContext) -> list[str]:
    """The quantize setups (``device_setups`` names) that store their int8 weights unsigned for the run's
    device (``quantize.unsigned_weights``, decided for ``bench.profile``)."""
    from edgekd.quantization.onnx_stage import candidate_configs, device_setups
    from edgekd.quantization.weight_encoding import device_of

    q = ctx.recipe.quantize
    if not q.enabled:
        return []
    return [name for name, c, _ in device_setups(candidate_configs(q), device_of(ctx.recipe.bench.profile))
            if c.unsigned_weights]


def quantize_settings(cfg) -> dict[str, Any]:
    """The quantize section as fingerprinted: the embedding keys (added later) are left out while both
    are at their defaults, and a candidate's unset ``embedding_bits`` too, so runs recorded before
    they existed stay valid."""
    from edgekd.recipe import QuantizeConfig

    d = cfg.model_dump(mode="json")
    keys = ("embedding_bits", "embedding_block_size", "embedding_float_rows")
    if all(d[k] == QuantizeConfig.model_fields[k].default for k in keys):
        for k in keys:
            del d[k]
    if d["smooth_alpha"] is None:  # added 2026-12-05: runs recorded before it stay valid
        del d["smooth_alpha"]
    if d["unsigned_weights"] == "auto":  # added 2026-12-06; what auto settles to is fingerprinted apart
        del d["unsigned_weights"]
    for cand in d["candidates"]:
        for k in ("embedding_bits", "embedding_float_rows", "smooth_alpha", "unsigned_weights"):
            if cand.get(k) is None:
                cand.pop(k, None)
    return d


def run_quantize(ctx: RunContext) -> dict[str, Any]:
    from edgekd.quantization import quantize_onnx
    from edgekd.quantization.weight_encoding import device_of

    task, cfg = ctx.task, ctx.recipe.quantize
    t0 = time.perf_counter()
    export = ctx.run.stage_dir("export")
    src = export / "onnx"
    others = _quantize_other_targets(ctx)  # Core ML (quantize.coreml_mode) beside the ONNX path
    if not (src / "artifact.json").is_file():
        if others:
            written = [export / n for n, r in others.items() if r.get("written", True)]
            drop_quantized_folders(export, keep=written)
            ctx.run.record("quantize", quantize_fingerprint(ctx), {"targets": others}, written,
                           seconds=time.perf_counter() - t0)
            return {"targets": others}
        raise StageError("quantize needs the ONNX (or Core ML) export: add onnx to export.targets and run "
                         "`edgekd export` first.")
    val_inputs, val_labels = ctx.validation_data()
    calib = ctx.calibration_data(cfg.calibration_split, cfg.calibration_samples) if calibrates(cfg) else None
    # Written under the name of the setup that wins (export/onnx-int8 for dynamic, onnx-int8-static, onnx-fp16),
    # which may be a candidate's method rather than the section's.
    report = quantize_onnx(src, lambda method: export / quantized_folder("onnx", method), cfg, calib, val_inputs,
                           val_labels, task.metrics, device=device_of(ctx.recipe.bench.profile))
    out_dir = Path(report["out_dir"])
    if getattr(calib, "rows", None):
        report["calibration"] = calib.rows  # which examples calibrated (count, how drawn, sha256 of their rows)
    # The metric of the quantized artifact on the test split, next to the float one (same runner as serving).
    from edgekd.export.parity import run_as_served
    from edgekd.export.stage import load_artifact

    test_inputs, test_labels = ctx.parity_data()
    for name, folder in (("float", src), ("quantized", out_dir)):
        runner, meta = load_artifact(folder)
        outputs = run_as_served(runner.run, test_inputs, 64, meta.get("precision"))
        report.setdefault("test", {})[name] = task.metrics(outputs, test_labels)
    if others:
        report["targets"] = others
    written = [out_dir] + [export / n for n, r in others.items() if r.get("written", True)]
    drop_quantized_folders(export, keep=written)
    ctx.run.record("quantize", quantize_fingerprint(ctx), report, written, seconds=time.perf_counter() - t0)
    return report


def quantized_folder_names(export: Path) -> list[Path]:
    """The folders under ``export`` named as a quantize stage names its output (``quantized_folder``: every
    registered target's quantized variants, e.g. onnx-int8, onnx-int8-static, onnx-fp16, coreml-linear8,
    coreml-palettize4); never an export target's own folder (onnx, coreml, onnx-nms)."""
    from edgekd.export import registered

    patterns = []
    for target, cls in registered().items():
        for fmt in cls.quantized.values():
            parts = [re.escape(text) + ("[0-9]+" if field is not None else "")
                     for text, field, _, _ in string.Formatter().parse(fmt)]
            patterns.append(re.compile(re.escape(f"{target}-") + "".join(parts)))
    if not Path(export).is_dir():
        return []
    return sorted(p for p in Path(export).iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(r.fullmatch(p.name) for r in patterns))


def drop_quantized_folders(export: Path, keep: list[Path] | tuple[Path, ...] = ()) -> list[str]:
    """Remove the quantized folders under ``export`` (``quantized_folder_names``) other than ``keep``: those a
    quantize run did not write this time (another method's name, a candidate's that no longer wins, a Core
    ML mode changed, a compression that failed) hold an earlier run's model, which the bench would measure
    and a client could serve as if current. Their files were only ever recorded by the quantize stage's
    record, which the caller then replaces. Returns the names removed."""
    from edgekd.export.stage import drop_stale

    kept = {Path(p).name for p in keep}
    gone = []
    for folder in quantized_folder_names(export):
        if folder.name not in kept:
            drop_stale(folder, "a quantized folder this quantize run did not write (an earlier setup's)")
            gone.append(folder.name)
    return gone


def _quantize_other_targets(ctx: RunContext) -> dict[str, Any]:
    """Core ML weight compression of export/coreml into export/coreml-<mode>, when that export exists."""
    from edgekd.quantization.coreml import quantize_coreml_folder
    from edgekd.warnings_log import library_output

    cfg, export = ctx.recipe.quantize, ctx.run.stage_dir("export")
    done: dict[str, Any] = {}
    if "coreml" in ctx.recipe.export.targets and (export / "coreml" / "artifact.json").is_file():
        name = quantized_folder("coreml", cfg.coreml_mode, palette_bits=cfg.palette_bits)
        test_inputs, _ = ctx.parity_data()
        try:
            # coremltools' progress bars on stderr go to the run's warnings log, not between the progress lines
            with library_output(f"quantize {name}"):
                done[name] = quantize_coreml_folder(export / "coreml", export / name, cfg, test_inputs)
        except StageError as e:  # recorded in the stage's report, not fatal to the ONNX path
            done[name] = {"written": False, "reason": str(e)}
    return done
