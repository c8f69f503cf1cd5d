"""TensorRT: a serialised engine (``model.plan``) built from the ONNX target's graph.

The ONNX target is called explicitly (plain graph, no ONNX Runtime fusions, opset 18 by default,
which TensorRT 8.6 and 10 both parse). Beside it go ``trtexec.sh`` and ``trtexec.txt`` with the exact
``trtexec`` command (min/opt/max shapes of the optimisation profile, precision), so the engine can
be built on the device that will run it: an engine is tied to its GPU model and TensorRT version.
Where ``tensorrt`` imports and a CUDA GPU is visible, the engine is built here with the TensorRT
Python API (fp16; int8 calibrated on the example inputs, with a reusable calibration cache).
"""

from __future__ import annotations

import importlib.util
import shlex
import stat
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import MissingBackendError, UnsupportedTargetError
from edgekd.export._common import (
    BATCH_AXIS,
    DEFAULT_MAX_BATCH,
    SEQUENCE_AXIS,
    axis_bounds,
    check_inputs,
    option,
    staged,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register
from edgekd.export.onnx import OnnxExporter

ENGINE = "model.plan"
TRT_ONNX_OPSET = 18
PRECISIONS = ("fp16", "fp32", "int8")


@register
class TensorRTExporter(Exporter):
    name = "tensorrt"
    suffix = ".plan"
    # What writing the TensorRT-ready ONNX needs; building the engine also needs tensorrt and a GPU.
    requires = ("torch", "onnx", "onnxscript")
    extra = "onnx"
    needs_gpu = True
    options = {
        "precision": "fp16 (default), fp32, or int8 (calibrated on the example inputs).",
        "opset": f"ONNX opset of the graph TensorRT parses (default {TRT_ONNX_OPSET}).",
        "max_batch": f"Largest batch of the optimisation profile (default {DEFAULT_MAX_BATCH}).",
        "opt_batch": "Batch TensorRT tunes kernels for (default min(8, max_batch)).",
        "max_sequence": "Longest sequence of the profile (default: the examples' length, i.e. max_length).",
        "opt_sequence": "Sequence length TensorRT tunes kernels for (default max_sequence).",
        "workspace_mb": "Builder workspace limit in MiB (default 4096).",
        "calibration_examples": "Examples used for int8 calibration (default 256).",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        precision = option(self.name, opts, "precision", str, "fp16", choices=PRECISIONS)
        opset = option(self.name, opts, "opset", int, TRT_ONNX_OPSET, minimum=18)
        max_batch = option(self.name, opts, "max_batch", int, DEFAULT_MAX_BATCH, minimum=1)
        opt_batch = option(self.name, opts, "opt_batch", int, min(8, max_batch), minimum=1)
        max_seq = option(self.name, opts, "max_sequence", int, None, minimum=1)
        opt_seq = option(self.name, opts, "opt_sequence", int, None, minimum=1)
        workspace_mb = option(self.name, opts, "workspace_mb", int, 4096, minimum=64)
        n_calib = option(self.name, opts, "calibration_examples", int, 256, minimum=1)
        check_inputs(example_inputs, io, self.name)
        out_dir = Path(out_dir)

        try:
            onnx_result = OnnxExporter().export(module, example_inputs, io, out_dir, opset=opset, optimize=False)
        except UnsupportedTargetError as e:
            err = UnsupportedTargetError(f"Export target 'tensorrt' builds from an ONNX graph, and: {e}")
            err.target, err.operator = self.name, getattr(e, "operator", None)  # type: ignore[attr-defined]
            raise err from e
        shapes = profile_shapes(io, example_inputs, max_batch, opt_batch, max_seq, opt_seq)
        calib = _calibration_batches(example_inputs, io, n_calib, opt_batch) if precision == "int8" else None
        command = trtexec_command(onnx_result.path.name, shapes, precision)
        with staged(out_dir) as tmp:
            script = tmp / "trtexec.sh"
            script.write_text(_script(command, precision))
            script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            (tmp / "trtexec.txt").write_text(_explain(command, shapes, precision))
            if calib:
                np.savez(tmp / "calibration.npz", **{k: np.concatenate([b[k] for b in calib]) for k in calib[0]})
        files = list(onnx_result.files) + [out_dir / "trtexec.sh", out_dir / "trtexec.txt"]
        if calib:
            files.append(out_dir / "calibration.npz")
        notes: dict[str, Any] = {
            "onnx": onnx_result.path.name, "onnx_notes": onnx_result.notes, "command": command,
            "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()},
        }
        engine = out_dir / ENGINE
        ready, why = engine_buildable()
        if not ready:
            return ExportResult(self.name, engine, files, built=False, reason=f"not built: {why}", notes=notes,
                                precision=precision)
        from edgekd.export._tensorrt_engine import build_engine

        with staged(out_dir) as tmp:
            notes.update(build_engine(onnx_result.path, tmp / ENGINE, shapes, precision, workspace_mb, calib))
            built_files = sorted(p.name for p in tmp.iterdir())
        files += [out_dir / f for f in built_files]
        return ExportResult(self.name, engine, files, notes=notes, precision=precision)

    def load(self, path: Path, **runtime_opts: Any) -> Any:
        unknown = sorted(set(runtime_opts) - {"threads"})  # threads: accepted, CPU threads do not apply
        if unknown:
            raise UnsupportedTargetError(f"The TensorRT runner does not accept option(s) {', '.join(unknown)}.")
        path = Path(path)
        if not path.is_file():
            raise UnsupportedTargetError(
                f"{path} does not exist: the TensorRT engine was not built here. On a machine with TensorRT "
                f"and the target GPU, run {path.parent / 'trtexec.sh'} (it writes {path.name}), then load again."
            )
        if importlib.util.find_spec("tensorrt") is None:
            raise MissingBackendError("Running a TensorRT engine", "tensorrt",
                                      why="TensorRT's libraries come from NVIDIA, beside the CUDA driver")
        ok, why = _cuda()
        if not ok:
            raise UnsupportedTargetError(f"A TensorRT engine runs only on a CUDA GPU: {why}.")
        from edgekd.export._tensorrt_engine import TensorRTRunner

        return TensorRTRunner(path)


def _cuda() -> tuple[bool, str | None]:
    from edgekd.export._tensorrt_engine import cuda_ready

    return cuda_ready()


def engine_buildable() -> tuple[bool, str | None]:
    """Whether an engine can be built here, and if not why (the reason recorded when it is not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT not installed"
    return _cuda()


def profile_shapes(io: ModelIO, examples: dict[str, np.ndarray], max_batch: int, opt_batch: int,
                   max_sequence: int | None, opt_sequence: int | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input: dynamic axes from 1 to their bound, others as the example."""
    bounds = axis_bounds(io, examples, max_batch, max_sequence)
    shapes = {}
    for name in io.input_names:
        base = tuple(int(s) for s in np.asarray(examples[name]).shape)
        lo, opt, hi = list(base), list(base), list(base)
        for axis, axis_name in io.dynamic_axes.get(name, {}).items():
            b_lo, b_hi = bounds[axis_name]
            lo[axis], hi[axis] = b_lo, b_hi
            want = opt_batch if axis_name == BATCH_AXIS else opt_sequence if axis_name == SEQUENCE_AXIS else None
            opt[axis] = min(max(want or b_hi, b_lo), b_hi)
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def trtexec_command(onnx_file: str, shapes: dict[str, tuple[tuple[int, ...], ...]], precision: str) -> list[str]:
    def spec(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())

    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={ENGINE}",
           f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}"]
    if precision in ("fp16", "int8"):
        cmd.append("--fp16")
    if precision == "int8":
        cmd.append("--int8")
    return cmd


def _script(command: list[str], precision: str) -> str:
    line = " ".join(shlex.quote(c) for c in command)
    calib = ""
    if precision == "int8":
        calib = ('# A calibration cache (written when edgekd builds the engine with TensorRT) gives real int8\n'
                 '# scales; without one trtexec uses placeholder scales, fit for timing only.\n'
                 'CALIB=""\n[ -f calibration.cache ] && CALIB="--calib=calibration.cache"\n')
        line += " $CALIB"
    return ("#!/bin/sh\n# Build the TensorRT engine for this folder's ONNX model, on the GPU that will run it.\n"
            f'set -e\ncd "$(dirname "$0")"\n{calib}{line} "$@"\n')


def _explain(command: list[str], shapes: dict[str, tuple[tuple[int, ...], ...]], precision: str) -> str:
    rows = "\n".join(f"  {n}: min {list(s[0])}, opt {list(s[1])}, max {list(s[2])}" for n, s in shapes.items())
    int8 = ("\nint8: run edgekd's tensorrt export where TensorRT is installed to calibrate on calibration.npz "
            "(the examples saved here) and write calibration.cache; trtexec without it measures speed only.\n"
            if precision == "int8" else "")
    return (f"TensorRT engine build for model.onnx ({precision}).\n\n{' '.join(shlex.quote(c) for c in command)}\n\n"
            f"Optimisation profile:\n{rows}\n\nThe engine ({ENGINE}) runs only on the GPU model and TensorRT "
            f"version that built it; edgekd loads {ENGINE} from this folder once it exists.\n{int8}")


def _calibration_batches(examples: dict[str, np.ndarray], io: ModelIO, n: int, batch: int) -> list[dict[str, np.ndarray]]:
    rows = min(n, len(np.asarray(examples[io.input_names[0]])))
    batch = min(batch, rows)
    arrays = {k: np.asarray(examples[k][: rows - rows % batch]).astype(io.dtypes.get(k, examples[k].dtype))
              for k in io.input_names}
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, rows - rows % batch, batch)]
