"""Every ONNX quantization variant of a run's exported student, side by side.

    python benchmarks/quantize_variants.py runs/default [--threads 2] [--out variants.json]

For each variant (float / dynamic / static QDQ with each calibration method, per-tensor or
per-channel, with or without ONNX Runtime's transformer fusions): validation and test accuracy,
batch-1 p50 on every test text at its own length (all models in one process, runs alternating
between models, same threads), file size, the operators in the file and the kernels ONNX
Runtime actually runs after its own graph optimisations. No guard, no float fallback: what each
setup gives on its own. Calibration reads the train split (never test).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

VARIANTS: list[tuple[str, dict]] = [
    ("float", {}),
    ("float/fused-attention", {"fuse": "attention"}),
    ("float/fused-multihead", {"fuse": "multihead"}),
    ("float/fused-packed", {"fuse": "packed"}),
    ("dynamic", {"method": "dynamic"}),
    ("dynamic/fused-attention", {"method": "dynamic", "fuse": "attention"}),
    ("dynamic/fused-multihead", {"method": "dynamic", "fuse": "multihead"}),
    ("dynamic/fused-packed", {"method": "dynamic", "fuse": "packed"}),
    ("dynamic/emb4", {"method": "dynamic", "embedding_bits": 4}),
    ("dynamic/emb4/fused-multihead", {"method": "dynamic", "fuse": "multihead", "embedding_bits": 4}),
    ("dynamic/emb4/fused-packed", {"method": "dynamic", "fuse": "packed", "embedding_bits": 4}),
    # Every table 4-bit, the small ones too (the row above keeps those in float: embedding_float_rows).
    ("dynamic/emb4/fused-packed/small-tables-4bit", {"method": "dynamic", "fuse": "packed", "embedding_bits": 4,
                                                     "embedding_float_rows": 0}),
    # Blocks of 16 values per scale instead of 32: finer 4-bit steps, scales twice the bytes.
    ("dynamic/emb4-b16/fused-packed", {"method": "dynamic", "fuse": "packed", "embedding_bits": 4,
                                       "embedding_block_size": 16}),
    ("dynamic/per-channel/fused-multihead", {"method": "dynamic", "fuse": "multihead", "per_channel": True}),
    ("dynamic/reduce-range/fused-multihead", {"method": "dynamic", "fuse": "multihead", "reduce_range": True}),
    ("static/minmax", {"method": "static"}),
    ("static/minmax/per-channel", {"method": "static", "per_channel": True}),
    ("static/minmax/fused-multihead", {"method": "static", "fuse": "multihead"}),
    ("static/minmax/per-channel/fused-multihead", {"method": "static", "fuse": "multihead", "per_channel": True}),
    ("static/entropy/per-channel/fused-multihead", {"method": "static", "fuse": "multihead", "per_channel": True,
                                                    "calibration_method": "entropy"}),
    ("static/percentile/per-channel/fused-multihead", {"method": "static", "fuse": "multihead",
                                                       "per_channel": True, "calibration_method": "percentile"}),
]


def kernels(path: Path, threads: int) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its own optimisations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--model", type=Path, default=None,
                    help="float ONNX file to quantize (default: RUN/export/onnx/model.onnx); the run gives the data")
    ap.add_argument("--only", nargs="*", help="variant names to run, float always with them (default: all)")
    ap.add_argument("--timed", type=int, default=None, help="time on the first N test texts (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="recipe override the run was made with (e.g. a prune_variants copy's keys), repeatable")
    args = ap.parse_args()

    import onnx

    from edgekd.cli import load_recipe_or_run
    from edgekd.export.onnx import fuse_file
    from edgekd.export.timing import ExternalDataError, write_residual_sums_as_adds
    from edgekd.pipeline import create_context
    from edgekd.quantization.calibration import real_length_rows
    from edgekd.quantization.guard import Evaluator, time_side_by_side
    from edgekd.quantization.onnx_methods import make_method
    from edgekd.quantization.onnx_stage import _graph_inputs, prepare
    from edgekd.recipe import QuantizeConfig

    ctx = create_context(load_recipe_or_run(str(args.run), args.set))
    src = args.model or args.run / "export" / "onnx" / "model.onnx"
    val_x, val_y = ctx.validation_data()
    test_x, test_y = ctx.parity_data()
    calib = ctx.calibration_data("train", args.calibration_samples)
    metric = ctx.task.metrics
    names, dtypes = _graph_inputs(src)
    # float is always measured: the table's speed-ups are against it
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only or v[0] == "float"]

    work = Path(tempfile.mkdtemp(prefix="edgekd-variants-"))
    # As the quantize stage does: an export that kept its session choice wrote its residual Adds as
    # Sum, and the fusions look for Add.
    try:
        if write_residual_sums_as_adds(src, work / "exported-adds.onnx"):
            src = work / "exported-adds.onnx"
    except ExternalDataError:
        pass  # the export never writes Sum into a model with external data (unfuse_in_file refuses it)
    floats, notes = {"none": src}, {}
    for fuse in ("attention", "multihead", "packed"):
        floats[fuse] = work / f"fused-{fuse}.onnx"
        notes[fuse] = fuse_file(src, floats[fuse], attention=fuse)
    prepared = {}
    for fuse, path in floats.items():
        p = work / f"prep-{fuse}" / "float.onnx"
        p.parent.mkdir()
        prepare(path, p, True)
        prepared[fuse] = p

    paths: dict[str, Path] = {}
    for name, over in variants:
        calibrates = over.get("method") == "static" or over.get("smooth_alpha") is not None
        cfg = QuantizeConfig(enabled=True, **over,  # the recipe refuses calibration_samples where nothing reads it
                             **({"calibration_samples": args.calibration_samples} if calibrates else {}))
        if "method" not in over:
            paths[name] = floats[cfg.fuse]
            continue
        cw = work / name.replace("/", "_")
        cw.mkdir()
        method = make_method(cfg, calib, names, dtypes, cw, False)
        out = cw / "model.onnx"
        method.quantize(prepared[cfg.fuse], out, [])
        paths[name] = out
        print(f"quantized {name}", flush=True)

    val_ev = Evaluator(val_x, val_y, metric, "accuracy", 1, args.threads)
    test_ev = Evaluator(test_x, test_y, metric, "accuracy", 1, args.threads)
    test_ev.reference = test_ev.score(src)["outputs"]
    rows = real_length_rows(test_x, args.timed)
    speed = time_side_by_side(paths, rows, len(rows), args.threads)
    lengths = [r["input_ids"].shape[1] for r in rows]
    for name in paths:  # printed first: the accuracies below take longest
        print(f"timed {name}: p50 {speed[name]['p50_ms']:.3f} ms, cpu p50 {speed[name]['cpu_p50_ms']:.3f} ms",
              flush=True)
    table = []
    for name, path in paths.items():
        t = test_ev.score(path)
        ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        table.append({
            "variant": name, "val_accuracy": val_ev.score(path)["metric"], "test_accuracy": t["metric"],
            "top1_agreement_vs_float": t["top1_agreement"], "max_abs_diff_vs_float": t["max_abs_diff"],
            "p50_ms": speed[name]["p50_ms"], "cpu_p50_ms": speed[name]["cpu_p50_ms"],
            "size_mb": round(path.stat().st_size / 1e6, 2), "file_ops": dict(ops.most_common()),
            "kernels": kernels(path, args.threads),
        })
        print(f"scored {name}: validation {table[-1]['val_accuracy']:.4f}, test {table[-1]['test_accuracy']:.4f}, "
              f"kernels {table[-1]['kernels']}", flush=True)
    base = next(r["p50_ms"] for r in table if r["variant"] == "float")
    print(f"\n{len(rows)} test texts one at a time at their real lengths ({min(lengths)}-{max(lengths)} tokens, "
          f"median {int(np.median(lengths))}), batch 1, {args.threads} threads, models alternating; "
          f"calibration: {args.calibration_samples} train texts; fusions: {notes}\n")
    print("| variant | val acc | test acc | p50 ms | x float | size MB |\n|---|--:|--:|--:|--:|--:|")
    for r in table:
        print(f"| {r['variant']} | {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} | {r['p50_ms']:.3f} | "
              f"{base / r['p50_ms']:.2f} | {r['size_mb']} |")
    print()
    for r in table:
        print(r["variant"], "kernels:", r["kernels"])
    if args.out:
        args.out.write_text(json.dumps({"rows": table, "fusions": notes, "lengths": lengths}, indent=1))


if __name__ == "__main__":
    main()
