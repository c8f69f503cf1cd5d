"""Does a run's int8 file lose accuracy to the u8s8 kernel's saturation on this CPU? The file against the
same integers stored unsigned, on every split, and both timed side by side.

    python benchmarks/saturation.py runs/default [--artifact onnx-int8] [--threads 2] [--timed N] [--out F]

ONNX Runtime multiplies uint8 activations by int8 weights with ``VPMADDUBSW`` on an x86 CPU without VNNI,
which saturates the int16 sum of each pair of neighbouring products: a wrong answer, no error. The twin
(``edgekd.quantization.weight_encoding.encode_unsigned``: every int8 weight and zero point + 128, in uint8)
is computed by the u8u8 kernels, which do not saturate, so where the two files differ the signed one is
the wrong one. For the shipped folder (the quantize stage's recommendation, or ``--artifact``), opened with
its own runtime options, each split (validation, test, the recipe's out-of-domain set) is run one text at a
time at its own length, as it is served, through both files: how far the logits move, how many answers
change, each file's accuracy and its mean logit error against the float folder it was quantized from. On a
CPU that cannot saturate (VNNI, AMX, ARM) the two compute the same integers, so the script fails if any
logit differs by more than float rounding (``EXACT_ATOL``). The same test texts then time the two side by
side (rotating blocks, same threads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError

# Where nothing saturates, the two files' logits differ by the rescaling's float rounding at most (the
# tolerance tests/test_weight_encoding.py holds the packed text model to).
EXACT_ATOL = 1e-5


def compare_outputs(signed: dict[str, np.ndarray], unsigned: dict[str, np.ndarray], labels: np.ndarray,
                    reference: dict[str, np.ndarray] | None, metric_fn: Any) -> dict[str, Any]:
    """Figures of one split from the two files' outputs (their first output: the logits); accuracy by
    the task's own ``metric_fn(outputs, labels)``."""
    name = next(iter(signed))
    s, u = np.asarray(signed[name], np.float64), np.asarray(unsigned[name], np.float64)
    diff = np.abs(s - u).reshape(len(s), -1).max(axis=1) if s.size else np.zeros(0)
    row = {
        "texts": len(s),
        "max_logit_diff": float(diff.max()) if diff.size else 0.0,
        "texts_differing": int((diff > 0).sum()),
        "answers_changed": int((s.argmax(-1) != u.argmax(-1)).sum()),
        "signed_accuracy": float(metric_fn(signed, labels)["accuracy"]),
        "unsigned_accuracy": float(metric_fn(unsigned, labels)["accuracy"]),
    }
    if reference is not None:
        r = np.asarray(reference[next(iter(reference))], np.float64)
        row["signed_error_vs_float"] = float(np.abs(s - r).mean())
        row["unsigned_error_vs_float"] = float(np.abs(u - r).mean())
    return row


def measure(folder: Path, splits: dict[str, tuple[dict[str, np.ndarray], np.ndarray]], metric_fn: Any,
            threads: int, timed: int | None, work: Path, reference: Path | None = None) -> dict[str, Any]:
    """Every figure for the artifact ``folder`` (its ``artifact.json`` names the file, the precision and the
    runtime options); ``splits``: name -> (inputs padded to one shape, labels); the timing reads the
    ``test`` split (else the first)."""
    from edgekd.export.timing import time_side_by_side
    from edgekd.quantization import weight_encoding as we
    from edgekd.quantization.calibration import real_length_rows
    from edgekd.quantization.guard import load_runner, run_all

    meta = json.loads((folder / "artifact.json").read_text())
    signed = folder / meta.get("file", "model.onnx")
    options = dict(meta.get("runtime_options") or {})
    precision = meta.get("precision")
    if we.signed_weights(signed) == 0:
        raise EdgeKDError(f"{signed}: no int8 weight an integer operator multiplies (precision {precision}), so "
                          "nothing can saturate: give an int8 folder with --artifact.")
    if any(p.suffix == ".data" for p in folder.iterdir()):
        raise EdgeKDError(f"{folder}: its weights are in an external data file; this script copies one .onnx file.")
    twin = work / "unsigned.onnx"
    shutil.copyfile(signed, twin)
    rewritten = we.encode_unsigned(twin)
    left_signed = we.signed_weights(twin)
    arch, isa = we.this_machine()
    can_saturate = we.saturates(arch, isa)

    runners = {"signed": load_runner(signed, threads, **options), "unsigned": load_runner(twin, threads, **options)}
    ref_runner = load_runner(reference, threads) if reference else None
    rows = {}
    for split, (inputs, labels) in splits.items():
        out = {k: run_all(r, inputs, precision=precision) for k, r in runners.items()}
        ref = run_all(ref_runner, inputs) if ref_runner else None
        rows[split] = compare_outputs(out["signed"], out["unsigned"], labels, ref, metric_fn)
        print(f"{split}: {json.dumps(rows[split])}", flush=True)

    inputs = (splits.get("test") or next(iter(splits.values())))[0]
    feeds = real_length_rows(inputs, timed)
    speed = time_side_by_side({"signed": (signed, options), "unsigned": (twin, options)}, feeds, len(feeds), threads)
    return {
        "artifact": str(folder), "precision": precision, "runtime_options": options, "threads": threads,
        "cpu": {"arch": arch, "isa": isa, "can_saturate": can_saturate},
        "weights_rewritten": rewritten, "weights_left_signed": left_signed,
        "reference": str(reference) if reference else None, "splits": rows,
        "timing": {"texts": len(feeds), "p50_ms": {k: v["p50_ms"] for k, v in speed.items()},
                   "signed_speedup": round(speed["unsigned"]["p50_ms"] / speed["signed"]["p50_ms"], 3)},
    }


def check(result: dict[str, Any]) -> str | None:
    """Why the figures are impossible, if they are: a CPU that cannot saturate must give both files the
    same outputs, to float rounding (the twin stores the same integers)."""
    if result["cpu"]["can_saturate"]:
        return None
    moved = {s: r["max_logit_diff"] for s, r in result["splits"].items() if r["max_logit_diff"] > EXACT_ATOL}
    if moved:
        return (f"this CPU ({result['cpu']['arch']}, {', '.join(result['cpu']['isa'])}) multiplies int8 weights "
                f"exactly, yet the two files differ ({moved}): the unsigned rewrite changed the model.")
    return None


def table(result: dict[str, Any]) -> str:
    cpu = result["cpu"]
    lines = [
        f"{result['artifact']} ({result['precision']}), {result['weights_rewritten']} int8 weights rewritten as uint8"
        f" ({result['weights_left_signed']} left signed: read by another node too); {result['threads']} threads;"
        f" this CPU: {cpu['arch']}, {'no VNNI: u8s8 can saturate' if cpu['can_saturate'] else 'cannot saturate'}",
        "",
        "| split | texts | max logit diff | texts differing | answers changed | signed acc | unsigned acc "
        "| signed err vs float | unsigned err vs float |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for split, r in result["splits"].items():
        err = [f"{r[k]:.4f}" if k in r else "—" for k in ("signed_error_vs_float", "unsigned_error_vs_float")]
        lines.append(f"| {split} | {r['texts']} | {r['max_logit_diff']:.4f} | {r['texts_differing']} | "
                     f"{r['answers_changed']} | {r['signed_accuracy']:.2%} | {r['unsigned_accuracy']:.2%} | "
                     f"{err[0]} | {err[1]} |")
    t = result["timing"]
    lines += ["", f"Side by side on {t['texts']} test texts at their own lengths, batch 1: signed "
                  f"{t['p50_ms']['signed']:.3f} ms, unsigned {t['p50_ms']['unsigned']:.3f} ms p50 "
                  f"(the signed file {t['signed_speedup']:.2f}x the unsigned one's speed)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder, e.g. runs/default")
    ap.add_argument("--artifact", default=None, help="export folder (default: the one the run ships)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timed", type=int, default=None, help="time on the first N test texts (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    from edgekd.api import load_recipe_or_run
    from edgekd.pipeline import create_context
    from edgekd.report import shipped_artifact
    from edgekd.runfolder import RunFolder, atomic_write_text

    try:
        name = args.artifact
        if name is None:
            name, why = shipped_artifact(RunFolder(args.run))
            if name is None:
                raise EdgeKDError(f"{args.run}: no shipped artifact: {why}")
        folder = args.run / "export" / name
        if not (folder / "artifact.json").is_file():
            raise EdgeKDError(f"{folder} has no artifact.json: give an export folder of this run with --artifact.")
        source = json.loads((folder / "artifact.json").read_text()).get("source") or {}
        float_folder = args.run / "export" / Path(source.get("folder") or "onnx").name
        float_meta = float_folder / "artifact.json"
        reference = (float_folder / json.loads(float_meta.read_text()).get("file", "model.onnx")
                     if float_meta.is_file() else None)
        ctx = create_context(load_recipe_or_run(str(args.run), None))
        if ctx.recipe.task != "text-classification":
            raise EdgeKDError(f"task '{ctx.recipe.task}': this script compares a classifier's logits and answers; "
                              "give a text-classification run.")
        splits = {"validation": ctx.validation_data(), "test": ctx.parity_data()}
        ood = ctx.ood_data()
        if ood:
            splits[f"out of domain ({ood[0]})"] = (ood[1], ood[2])
        with tempfile.TemporaryDirectory(prefix="edgekd-saturation-") as work:
            result = measure(folder, splits, ctx.task.metrics, args.threads, args.timed, Path(work), reference)
    except EdgeKDError as e:
        sys.exit(f"saturation: {e}")
    print("\n" + table(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
    problem = check(result)
    if problem:
        sys.exit(f"saturation: {problem}")


if __name__ == "__main__":
    main()
