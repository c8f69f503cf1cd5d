"""TensorRT: a serialised engine (``model.plan``) built from an ONNX graph, strongly typed.

The ONNX target is called explicitly (plain graph, no ONNX Runtime fusions, opset 18 by default).
Precision is carried by the graph, as TensorRT 10 (strongly typed networks) and 11 (where weak
typing, precision builder flags and the int8 calibrator are gone) expect:

* ``fp32``: the plain graph, ``model.onnx``.
* ``fp16`` (default): ``model_fp16.onnx``, the graph converted to fp16 with float inputs/outputs
  kept (NVIDIA ModelOpt AutoCast when installed, TensorRT 11's documented route; else ONNX
  Runtime's float16 converter, the one the quantize stage's ``fp16`` method uses).
* ``int8``: explicit quantization from a Q/DQ graph, ``model_int8.onnx``: the quantize stage's
  static int8 model (``quantize.method: static``, symmetric int8), passed as the ``qdq_onnx`` option
  (``export.options.tensorrt.qdq_onnx``); int8 is never calibrated here.

Beside it go ``trtexec.sh`` and ``trtexec.txt`` with the exact ``trtexec`` command (min/opt/max
shapes of the optimisation profile), so the engine can be built on the device that will run it: an
engine is tied to its GPU model and TensorRT version. Where ``tensorrt`` imports and a CUDA GPU is
visible, the engine is built here with the TensorRT Python API (``_tensorrt_engine``).
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import MissingBackendError, RecipeError, UnsupportedTargetError
from edgekd.export._common import (
    BATCH_AXIS,
    DEFAULT_MAX_BATCH,
    SEQUENCE_AXIS,
    axis_bounds,
    check_inputs,
    option,
    refuse_threads,
    staged,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register
from edgekd.export.onnx import OnnxExporter

ENGINE = "model.plan"
TRT_ONNX_OPSET = 18
PRECISIONS = ("fp16", "fp32", "int8")
GRAPH = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
DEFAULT_WORKSPACE_MB = 4096


@register
class TensorRTExporter(Exporter):
    name = "tensorrt"
    suffix = ".plan"
    # What writing the TensorRT-ready ONNX needs; building the engine also needs tensorrt and a GPU.
    requires = ("torch", "onnx", "onnxscript")
    extra = "onnx"
    needs_gpu = True
    applies_threads = False
    options = {
        "precision": "fp16 (default: the graph converted to fp16), fp32, or int8 (from qdq_onnx).",
        "qdq_onnx": "int8: the Q/DQ ONNX model to build from (the quantize stage passes its static int8 model).",
        "opset": f"ONNX opset of the graph TensorRT parses (default {TRT_ONNX_OPSET}).",
        "max_batch": f"Largest batch of the optimisation profile (default {DEFAULT_MAX_BATCH}).",
        "opt_batch": "Batch TensorRT tunes kernels for (default min(8, max_batch)).",
        "max_sequence": "Longest sequence of the profile (default: the examples' length, i.e. max_length).",
        "opt_sequence": "Sequence length TensorRT tunes kernels for (default max_sequence).",
        "workspace_mb": "Builder workspace limit in MiB (default 4096), here and in trtexec.sh's command.",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        precision = option(self.name, opts, "precision", str, "fp16", choices=PRECISIONS)
        qdq = option(self.name, opts, "qdq_onnx", (str, Path), None)
        opset = option(self.name, opts, "opset", int, TRT_ONNX_OPSET, minimum=18)
        max_batch = option(self.name, opts, "max_batch", int, DEFAULT_MAX_BATCH, minimum=1)
        opt_batch = option(self.name, opts, "opt_batch", int, min(8, max_batch), minimum=1)
        max_seq = option(self.name, opts, "max_sequence", int, None, minimum=1)
        opt_seq = option(self.name, opts, "opt_sequence", int, None, minimum=1)
        workspace_mb = option(self.name, opts, "workspace_mb", int, DEFAULT_WORKSPACE_MB, minimum=64)
        if precision == "int8" and qdq is None:
            raise RecipeError([
                "export.options.tensorrt.precision: int8 engines are built from a Q/DQ model (explicit quantization; "
                "TensorRT 11 has no calibrator): run the quantize stage with quantize.method: static (symmetric "
                "int8), then set export.options.tensorrt.qdq_onnx to its export/onnx-int8-static/model.onnx"])
        if qdq is not None and precision != "int8":
            raise RecipeError([f"export.options.tensorrt.qdq_onnx is for precision int8, not {precision}"])
        check_inputs(example_inputs, io, self.name)
        out_dir = Path(out_dir)

        try:
            onnx_result = OnnxExporter().export(module, example_inputs, io, out_dir, opset=opset, optimize=False)
        except UnsupportedTargetError as e:
            err = UnsupportedTargetError(f"Export target 'tensorrt' builds from an ONNX graph, and: {e}")
            err.target, err.operator = self.name, getattr(e, "operator", None)  # type: ignore[attr-defined]
            raise err from e
        shapes = profile_shapes(io, example_inputs, max_batch, opt_batch, max_seq, opt_seq)
        graph = out_dir / GRAPH[precision]
        notes: dict[str, Any] = {"onnx": onnx_result.path.name, "onnx_notes": onnx_result.notes}
        with staged(out_dir) as tmp:
            if precision == "fp16":
                notes["fp16_converter"] = to_fp16(onnx_result.path, tmp / graph.name)
            elif precision == "int8":
                notes["qdq"] = check_qdq(Path(qdq), io)
                shutil.copyfile(qdq, tmp / graph.name)
            command = trtexec_command(graph.name, shapes, workspace_mb)
            script = tmp / "trtexec.sh"
            script.write_text(_script(command))
            script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            (tmp / "trtexec.txt").write_text(_explain(command, shapes, precision))
        files = list(onnx_result.files) + [out_dir / "trtexec.sh", out_dir / "trtexec.txt"]
        if graph != onnx_result.path:
            files.append(graph)
        notes.update(command=command, built_from=graph.name, workspace_mb=workspace_mb,
                     profile={n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()})
        engine = out_dir / ENGINE
        ready, why = engine_buildable()
        if not ready:
            return ExportResult(self.name, engine, files, built=False, reason=f"not built: {why}", notes=notes,
                                precision=precision)
        from edgekd.export._tensorrt_engine import build_engine

        with staged(out_dir) as tmp:
            notes.update(build_engine(graph, tmp / ENGINE, shapes, workspace_mb))
            built_files = sorted(p.name for p in tmp.iterdir())
        files += [out_dir / f for f in built_files]
        return ExportResult(self.name, engine, files, notes=notes, precision=precision)

    def stand_in(self, result: ExportResult, folder: Path) -> tuple[Any, str] | None:
        """Where the engine was not built here: the ONNX graph it is built from (``built_from``), run by ONNX
        Runtime, so what TensorRT gets is checked as far as this machine allows. Not the engine: its kernels,
        fusions and fp16 accumulation are TensorRT's, measured on the device (``edgekd bench``)."""
        graph = result.notes.get("built_from")
        if result.built or not graph:
            return None
        what = (f"{result.precision} ONNX graph {graph} that TensorRT builds the engine from, run by ONNX Runtime "
                "here: not the engine")
        if result.precision == "int8":
            return ("an int8 Q/DQ graph: its accuracy is the quantize stage's check (quantize.method: static), "
                    "not this one"), what
        try:
            return OnnxExporter().load(Path(folder) / graph), what
        except (MissingBackendError, UnsupportedTargetError) as e:
            return f"it does not run here: {e}", what

    def load(self, path: Path, **runtime_opts: Any) -> Any:
        refuse_threads(self.name, runtime_opts, "a TensorRT engine runs on the GPU; CPU threads do not apply to it")
        unknown = sorted(set(runtime_opts) - {"threads"})
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


def to_fp16(src: Path, dst: Path) -> str:
    """Write ``src`` converted to fp16 (float inputs and outputs kept) to ``dst``; return the converter.
    Strongly typed TensorRT runs each layer in the type its tensors have, so this is what makes fp16."""
    import onnx

    if importlib.util.find_spec("modelopt") is not None:
        # TensorRT 11's migration guide: modelopt.onnx.autocast.convert_to_mixed_precision.
        from modelopt.onnx import autocast

        half = autocast.convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
        converter = "modelopt.onnx.autocast"
    else:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as e:
            raise MissingBackendError("The fp16 TensorRT graph", "onnxruntime", "onnx", str(e)) from None
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        converter = "onnxruntime.transformers.float16"
    onnx.save(half, str(dst))
    return converter


def check_qdq(path: Path, io: ModelIO | None = None) -> dict[str, Any]:
    """A Q/DQ model TensorRT can build for this model: the inputs and outputs ``io`` names (a model of
    another task or layout is refused: its engine would be recorded for this one), QuantizeLinear/
    DequantizeLinear pairs with int8 zero points of 0 (TensorRT quantizes symmetrically). Returns counts and
    the file's sha256 for the notes; anything else is a clear error."""
    import onnx
    from onnx import numpy_helper

    from edgekd.runfolder import sha256_file

    if not path.is_file():
        raise UnsupportedTargetError(f"{path} does not exist: run the quantize stage (quantize.method: static) first.")
    model = onnx.load(str(path))
    if io is not None:
        init_names = {t.name for t in model.graph.initializer}
        got = ([i.name for i in model.graph.input if i.name not in init_names], [o.name for o in model.graph.output])
        if sorted(got[0]) != sorted(io.input_names) or sorted(got[1]) != sorted(io.output_names):
            raise UnsupportedTargetError(
                f"{path} takes {got[0]} and gives {got[1]}, and this model takes {list(io.input_names)} and gives "
                f"{list(io.output_names)}: export.options.tensorrt.qdq_onnx must be the static int8 model of this "
                "run's own export (export/onnx-int8-static/model.onnx after `edgekd quantize`).")
    nodes = list(model.graph.node)
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    if not q or not dq:
        raise UnsupportedTargetError(
            f"{path} has no QuantizeLinear/DequantizeLinear nodes: a TensorRT int8 engine needs a Q/DQ model "
            "(quantize.method: static); dynamic int8 (MatMulInteger) does not build in TensorRT."
        )
    inits = {t.name: t for t in model.graph.initializer}
    bad = []
    for n in q + dq:
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype != np.int8 or arr.any():
            bad.append(f"{n.name or n.output[0]} ({arr.dtype}, zero point {arr.ravel()[:1].tolist()})")
    if bad:
        raise UnsupportedTargetError(
            f"{path}: TensorRT quantizes symmetrically (int8, zero point 0), but {len(bad)} Q/DQ node(s) are not, "
            f"e.g. {bad[0]}. Quantize with quantize.activation_type: qint8 and symmetric activations."
        )
    return {"quantize_nodes": len(q), "dequantize_nodes": len(dq), "file": str(path), "sha256": sha256_file(path)}


def trtexec_command(onnx_file: str, shapes: dict[str, tuple[tuple[int, ...], ...]],
                    workspace_mb: int = DEFAULT_WORKSPACE_MB) -> list[str]:
    """No precision flags: the graph's types decide (TensorRT 11 removed the precision and calibration flags).
    The builder's workspace limit is the one the Python API build sets (``workspace_mb``, MiB)."""
    def spec(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())

    return ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={ENGINE}",
            f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}",
            f"--memPoolSize=workspace:{workspace_mb}M"]


# Run by trtexec.sh once the engine is built on the device: records the engine in artifact.json (its
# sha256, size, built) and seals it again the way edgekd.export.base.write_artifact_meta does, so
# `edgekd serve`, `edgekd bench` and edgekd.load verify and load it. Python's standard library only.
_RECORD_ENGINE = '''import hashlib, json, os, sys
engine, meta_file = sys.argv[1], "artifact.json"
with open(meta_file) as f:
    meta = json.load(f)
h = hashlib.sha256()
with open(engine, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
meta.pop("meta_sha256", None)
meta.update(sha256=h.hexdigest(), size_bytes=os.path.getsize(engine), built=True, reason=None)
meta.setdefault("files", {})[engine] = meta["sha256"]
meta.setdefault("notes", {})["built_by"] = "trtexec.sh, on the device"
graph = (meta.get("parity") or {}).get("graph")
meta["parity"] = {"ran": False, "reason": "built on the device by trtexec.sh from this folder's graph, "
                  "after the export; edgekd bench measures its accuracy there"}
if graph:  # the export's check of the graph it was built from, under ONNX Runtime
    meta["parity"]["graph"] = graph
    if graph.get("passed") is False:
        meta["parity"]["passed"] = False
meta["meta_sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
with open(meta_file + ".tmp", "w") as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True))
os.replace(meta_file + ".tmp", meta_file)
print("trtexec.sh: recorded " + engine + " (sha256 " + meta["sha256"][:12] + ") in " + meta_file)
'''


def _script(command: list[str]) -> str:
    line = " ".join(shlex.quote(c) for c in command)
    # TensorRT 10's trtexec types networks strongly only when asked; 11's always does.
    strong = ('STRONG=""\n# TensorRT 10 (trtexec prints e.g. "TensorRT v100300") needs --stronglyTyped; 11 always is.\n'
              'trtexec --help 2>&1 | grep -q "TensorRT v10" && STRONG="--stronglyTyped"\n')
    record = ("# Record the engine in artifact.json (sha256, size), so edgekd verifies and loads it.\n"
              "command -v python3 >/dev/null 2>&1 || { echo \"trtexec.sh: built $ENGINE, but recording it in "
              "artifact.json needs python3; without it edgekd cannot verify the engine\" >&2; exit 1; }\n"
              f"python3 - \"$ENGINE\" <<'EDGEKD_PY'\n{_RECORD_ENGINE}EDGEKD_PY\n")
    return ("#!/bin/sh\n# Build the TensorRT engine for this folder's ONNX model, on the GPU that will run it.\n"
            f'set -e\ncd "$(dirname "$0")"\nENGINE={ENGINE}\nrm -f "$ENGINE"\n{strong}{line} $STRONG "$@"\n'
            '[ -s "$ENGINE" ] || { echo "trtexec.sh: trtexec wrote no $ENGINE" >&2; exit 1; }\n' + record)


def _explain(command: list[str], shapes: dict[str, tuple[tuple[int, ...], ...]], precision: str) -> str:
    rows = "\n".join(f"  {n}: min {list(s[0])}, opt {list(s[1])}, max {list(s[2])}" for n, s in shapes.items())
    return (f"TensorRT engine build ({precision}, strongly typed: {command[1][7:]} carries the precision)."
            f"\n\n{' '.join(shlex.quote(c) for c in command)}\n\n"
            f"Optimisation profile:\n{rows}\n\nThe engine ({ENGINE}) runs only on the GPU model and TensorRT "
            f"version that built it. trtexec.sh records it in artifact.json (sha256, size), so edgekd serve, "
            f"edgekd bench and edgekd.load verify and load {ENGINE} from this folder once it is built.\n")
