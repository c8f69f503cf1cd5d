"""Weight compression of a Core ML ML program (``.mlpackage``) with ``coremltools.optimize``.

``linear8``: 8-bit symmetric per-channel linear quantization of the weights
(``OpLinearQuantizerConfig``); ``palettize``: k-means palettization to ``palette_bits`` bits
(``OpPalettizerConfig``). Both rewrite the weights as ``constexpr`` ops that Core ML expands at
load time. Compression runs on any OS; predictions (and so the accuracy check) need macOS, so
elsewhere the report measures the weight error instead and says that prediction was not run.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import MissingBackendError, StageError
from edgekd.recipe import QuantizeConfig
from edgekd.runfolder import atomic_dir

# Weights smaller than this stay as they are (biases, norms): compressing them saves nothing.
WEIGHT_THRESHOLD = 2048


def _ct():
    try:
        import coremltools as ct
        import coremltools.optimize.coreml as cto
    except ImportError as e:
        raise MissingBackendError("Core ML weight compression", "coremltools", "coreml", str(e)) from None
    return ct, cto


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _op_types(model: Any) -> dict[str, int]:
    spec = model.get_spec()
    counts: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def _weight_error(original: Any, compressed: Any, cto: Any) -> dict[str, float]:
    """Relative L2 error of the decompressed weights against the originals, over the compressed ones."""
    before = {k: np.asarray(v.val, dtype=np.float64) for k, v in cto.get_weights_metadata(original, 0).items()}
    restored = cto.decompress_weights(compressed)
    after = {k: np.asarray(v.val, dtype=np.float64) for k, v in cto.get_weights_metadata(restored, 0).items()}
    errs = []
    for name, w in before.items():
        # Compression renames a weight (e.g. "w" -> "w_quantized"); match by prefix and shape.
        match = [v for k, v in after.items() if (k == name or k.startswith(name + "_")) and v.shape == w.shape]
        if w.size >= WEIGHT_THRESHOLD and len(match) == 1:
            errs.append(float(np.linalg.norm(match[0] - w) / max(np.linalg.norm(w), 1e-12)))
    return {"weights_compared": len(errs), "max_relative_error": max(errs, default=0.0),
            "mean_relative_error": float(np.mean(errs)) if errs else 0.0}


def quantize_coreml(mlpackage: Path, out_path: Path, cfg: QuantizeConfig) -> dict[str, Any]:
    """Compress the weights of ``mlpackage`` into ``out_path`` (an .mlpackage, written atomically)."""
    ct, cto = _ct()
    mlpackage, out_path = Path(mlpackage), Path(out_path)
    if not mlpackage.exists():
        raise StageError(f"{mlpackage} does not exist: export the 'coreml' target first")
    model = ct.models.MLModel(str(mlpackage), skip_model_load=True)
    if model.get_spec().WhichOneof("Type") != "mlProgram":
        raise StageError(f"{mlpackage} is a neural network, not an ML program: convert with convert_to='mlprogram'")
    if cfg.coreml_mode == "linear8":
        op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=WEIGHT_THRESHOLD)
        compressed = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_cfg))
        precision = "int8-weights"
    else:
        op_cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=cfg.palette_bits, weight_threshold=WEIGHT_THRESHOLD)
        compressed = cto.palettize_weights(model, cto.OptimizationConfig(global_config=op_cfg))
        precision = f"palettized-{cfg.palette_bits}bit"
    with atomic_dir(out_path) as tmp:
        staged = tmp / out_path.name
        compressed.save(str(staged))
        # atomic_dir renames the staging folder to out_path, so the package must be its content.
        for item in staged.iterdir():
            os.replace(item, tmp / item.name)
        shutil.rmtree(staged)
    ops = _op_types(compressed)
    report = {
        "mode": cfg.coreml_mode, "precision": precision,
        "size_bytes_before": _size(mlpackage), "size_bytes_after": _size(out_path),
        "constexpr_ops": {k: v for k, v in ops.items() if k.startswith("constexpr")},
        "weight_error": _weight_error(model, compressed, cto),
    }
    where = "here" if platform.system() == "Darwin" else "on macOS (Core ML predicts only there)"
    report["accuracy_guard"] = {
        "skipped": f"not evaluated by this function: run the coreml target's parity check {where}; "
                   "weight_error above is the check that runs everywhere"
    }
    return report


def quantize_coreml_folder(src: Path, out: Path, cfg: QuantizeConfig, test_inputs: dict[str, np.ndarray] | None = None,
                           batch_size: int = 16) -> dict[str, Any]:
    """The quantize stage's Core ML path: compress ``src`` (the coreml export folder) into ``out``, an
    export folder like any other (tokenizer, artifact.json), so bench and serve take it as they are.

    Parity (compressed package against the float one on ``test_inputs``) runs where Core ML predicts,
    i.e. on macOS; elsewhere artifact.json says it did not run and why, next to the weight error."""
    import sys
    from datetime import datetime, timezone

    from edgekd.export.base import read_artifact_meta, write_artifact_meta
    from edgekd.export.coreml import verify_spec
    from edgekd.export.stage import artifact_digest

    src, out = Path(src), Path(out)
    meta = read_artifact_meta(src)
    package = src / meta["file"]
    with atomic_dir(out) as tmp:
        for item in src.iterdir():
            if item.name in (meta["file"], "artifact.json") or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        report = quantize_coreml(package, tmp / package.name, cfg)
        if not report["constexpr_ops"] or not report["weight_error"]["max_relative_error"]:
            # A folder labelled int8/palettized whose weights are the float ones would be silently wrong.
            raise StageError(
                f"Core ML compression (quantize.coreml_mode: {cfg.coreml_mode}) left every weight of {package} "
                f"unchanged (no constexpr op, weight error {report['weight_error']}): no {out.name} was written. "
                "Compress with coremltools yourself, or drop coreml from export.targets for the quantize stage."
            )
        parity: dict[str, Any]
        if sys.platform == "darwin" and test_inputs is not None:
            from edgekd.export.coreml import CoreMLRunner
            from edgekd.export.parity import run_batched

            want = run_batched(CoreMLRunner(package).run, test_inputs, batch_size)
            got = run_batched(CoreMLRunner(tmp / package.name).run, test_inputs, batch_size)
            name = next(iter(want))
            parity = {"ran": True, "reference": "float Core ML package",
                      "max_abs_diff": float(np.max(np.abs(got[name] - want[name]))),
                      "top1_agreement": float(np.mean(got[name].argmax(-1) == want[name].argmax(-1)))}
        else:
            parity = {"ran": False, "reason": "Core ML predicts only on macOS; the weight error is checked instead",
                      "weight_error": report["weight_error"]}
        report["parity"] = parity
        new = dict(meta)
        new.update(precision=report["precision"], sha256=artifact_digest(tmp / package.name),
                   size_bytes=_size(tmp / package.name), parity=parity,
                   files={n: artifact_digest(tmp / n) for n in (meta.get("files") or {package.name: None})
                          if (tmp / n).exists()},
                   source={"folder": str(src), "sha256": meta.get("sha256"), "precision": meta.get("precision")},
                   # The compressed package's own spec (its constexpr ops), never the float package's.
                   notes={**(meta.get("notes") or {}), "spec": verify_spec(tmp / package.name)},
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   quantization={"method": f"coreml-{cfg.coreml_mode}", **{k: report[k] for k in
                                 ("mode", "precision", "size_bytes_before", "size_bytes_after", "weight_error")}})
        write_artifact_meta(tmp, new)
    return report
