"""Core ML: an ML program (``model.mlpackage``) converted by coremltools from a traced module.

Batch and sequence axes are flexible (``ct.RangeDim``, bounded so the Neural Engine can plan
memory). Integer inputs become int32, the widest integer Core ML takes; the runner casts. The
conversion runs on Linux; prediction needs the Core ML framework, i.e. macOS, so here the saved
package is checked by ``verify_spec`` (names, shapes, op count, spec version) instead.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import ParityError, UnsupportedTargetError
from edgekd.export._common import (
    DEFAULT_MAX_BATCH,
    axis_bounds,
    check_inputs,
    export_examples,
    option,
    prepare_module,
    runner_inputs,
    staged,
    unsupported,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register

PACKAGE = "model.mlpackage"
DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15",
                      "watchOS9", "tvOS16")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
_OP_PATTERNS = (r"convert function for op '([^']+)' not implemented", r"[Uu]nsupported op(?:erator)? '?([\w.:]+)")
_ADVICE = "Replace the operator in the model, register a coremltools op converter for it, or export to another target."


def _forget_stale_symbols() -> None:
    """coremltools keeps the shape-symbol names of a conversion (``batch``, ``sequence``) until that
    conversion succeeds; after a failed one in the same process, naming the same symbol again raises
    "Symbol `batch` is used already". No conversion is under way here, so the leftovers are cleared."""
    try:
        from coremltools.converters.mil.mil.types.symbolic import k_used_symbols
    except ImportError:  # moved in another coremltools version: nothing to clear there
        return
    k_used_symbols.clear()


@register
class CoreMLExporter(Exporter):
    name = "coreml"
    suffix = ".mlpackage"
    requires = ("torch", "coremltools")
    extra = "coreml"
    options = {
        "compute_precision": "fp16 (default; Neural Engine/GPU friendly) or fp32.",
        "deployment_target": f"Oldest OS the package runs on: {', '.join(DEPLOYMENT_TARGETS)} (default iOS16).",
        "max_batch": f"Largest batch the package accepts (default {DEFAULT_MAX_BATCH}).",
        "max_sequence": "Longest sequence it accepts (default: the examples' length, i.e. max_length).",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        precision = option(self.name, opts, "compute_precision", str, "fp16", choices=("fp16", "fp32"))
        target = option(self.name, opts, "deployment_target", str, "iOS16", choices=DEPLOYMENT_TARGETS)
        max_batch = option(self.name, opts, "max_batch", int, DEFAULT_MAX_BATCH, minimum=1)
        max_seq = option(self.name, opts, "max_sequence", int, None, minimum=1)
        check_inputs(example_inputs, io, self.name)
        import coremltools as ct
        import torch

        module = prepare_module(module)
        examples = export_examples(example_inputs, io)
        _forget_stale_symbols()
        bounds = axis_bounds(io, {k: np.asarray(v) for k, v in example_inputs.items()}, max_batch, max_seq)
        sizes = {axis_name: int(examples[name].shape[axis])
                 for name in io.input_names for axis, axis_name in io.dynamic_axes.get(name, {}).items()}
        dims = {n: ct.RangeDim(lower_bound=lo, upper_bound=hi, default=min(max(sizes[n], lo), hi), symbol=n)
                for n, (lo, hi) in bounds.items()}
        inputs = []
        for name in io.input_names:
            shape: list[Any] = list(examples[name].shape)
            for axis, axis_name in io.dynamic_axes.get(name, {}).items():
                shape[axis] = dims[axis_name]
            dtype = np.int32 if np.issubdtype(examples[name].dtype, np.integer) else np.float32
            inputs.append(ct.TensorType(name=name, shape=ct.Shape(shape), dtype=dtype))
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, tuple(torch.from_numpy(examples[n]) for n in io.input_names),
                                         strict=False, _store_inputs=False)
            model = ct.convert(
                traced, inputs=inputs, outputs=[ct.TensorType(name=n) for n in io.output_names],
                convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            )
        except Exception as e:  # the converter's failure becomes one that names the operator
            raise unsupported(self.name, e, _OP_PATTERNS, _ADVICE) from e
        out_dir = Path(out_dir)
        with staged(out_dir) as tmp:
            model.save(str(tmp / PACKAGE))
        path = out_dir / PACKAGE
        notes = {"spec": verify_spec(path, io), "deployment_target": target,
                 "bounds": {k: list(v) for k, v in bounds.items()},
                 "predicts_on": "macOS only (Core ML); the spec is checked on every platform"}
        return ExportResult(self.name, path, [path], notes=notes, precision=precision)

    def load(self, path: Path, **runtime_opts: Any) -> CoreMLRunner:
        unknown = sorted(set(runtime_opts) - {"compute_units", "threads"})
        if unknown:
            raise UnsupportedTargetError(
                f"The Core ML runner does not accept option(s) {', '.join(unknown)}; allowed: compute_units."
            )
        if sys.platform != "darwin":
            raise UnsupportedTargetError(
                f"Core ML predicts only on macOS (this is {sys.platform}): copy {Path(path).parent} to a Mac to "
                "run it; here its spec is checked with edgekd.export.coreml.verify_spec."
            )
        return CoreMLRunner(Path(path), runtime_opts.get("compute_units", "ALL"))


def _array_type(ct: Any, feature: Any) -> str:
    return ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(feature.type.multiArrayType.dataType)


def _count_ops(block: Any, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def verify_spec(path: Path, io: ModelIO | None = None) -> dict[str, Any]:
    """Read a saved package's spec: spec version, inputs (dtype, default shape, ranges), outputs, ops.

    With ``io``, the names must match it and every dynamic axis must be flexible in the package;
    a mismatch is a ParityError (the package would not accept what the source model accepts)."""
    import coremltools as ct

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise UnsupportedTargetError(f"{path} is not a Core ML package (no Manifest.json): re-export 'coreml'.")
    spec = ct.utils.load_spec(str(path))
    inputs = []
    for f in spec.description.input:
        arr = f.type.multiArrayType
        ranges = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        inputs.append({"name": f.name, "dtype": _array_type(ct, f), "shape": list(arr.shape), "ranges": ranges})
    outputs = [{"name": f.name, "dtype": _array_type(ct, f)} for f in spec.description.output]
    counts: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for fn in spec.mlProgram.functions.values():
            for block in fn.block_specializations.values():
                _count_ops(block, counts)
    info = {
        "spec_version": int(spec.specificationVersion),
        "model_type": spec.WhichOneof("Type"),
        "inputs": inputs,
        "outputs": outputs,
        "op_count": int(sum(counts.values())),
        "compute_op_count": int(sum(v for k, v in counts.items() if k != "const")),
        "op_types": dict(counts.most_common()),
    }
    if io is not None:
        _match(path, info, io)
    return info


def _match(path: Path, info: dict[str, Any], io: ModelIO) -> None:
    problems = []
    names_in = [i["name"] for i in info["inputs"]]
    names_out = [o["name"] for o in info["outputs"]]
    if names_in != list(io.input_names):
        problems.append(f"inputs are {names_in}, expected {io.input_names}")
    if names_out != list(io.output_names):
        problems.append(f"outputs are {names_out}, expected {io.output_names}")
    by_name = {i["name"]: i for i in info["inputs"]}
    for name in io.input_names:
        axes = io.dynamic_axes.get(name, {})
        ranges = by_name.get(name, {}).get("ranges") or []
        for axis in axes:
            if axis >= len(ranges) or ranges[axis][0] == ranges[axis][1]:
                problems.append(f"axis {axis} of '{name}' is not flexible")
    if info["model_type"] != "mlProgram" or info["compute_op_count"] == 0:
        problems.append("the package holds no ML program operations")
    if problems:
        raise ParityError(f"Core ML package {path} does not match the source model: {'; '.join(problems)}.")


class CoreMLRunner:
    """``MLModel.predict`` on macOS; integer inputs cast to the package's int32."""

    def __init__(self, path: Path, compute_units: str = "ALL"):
        import coremltools as ct

        if compute_units not in COMPUTE_UNITS:
            raise UnsupportedTargetError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}.")
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])
        info = verify_spec(path)
        self.input_names = [i["name"] for i in info["inputs"]]
        self.output_names = [o["name"] for o in info["outputs"]]
        self._dtypes = {i["name"]: np.int32 if i["dtype"] == "INT32" else np.float32 for i in info["inputs"]}
        self.device = compute_units
        first = info["inputs"][0]["ranges"] if info["inputs"] else []
        self.max_batch = int(first[0][1]) if first and first[0][1] > 0 else None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = runner_inputs(inputs, self.input_names, self._dtypes, "This Core ML model")
        out = self.model.predict(dict(zip(self.input_names, arrays, strict=True)))
        return {n: np.asarray(out[n], dtype=np.float32) for n in self.output_names}
