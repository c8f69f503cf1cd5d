"""Core ML: an ML program (``model.mlpackage``) converted by coremltools from a traced module.

Shapes are **enumerated** (``ct.EnumeratedShapes``): batch 1 and the ``batch_sizes`` (the bench's
by default) up to ``max_batch``, each at ``max_sequence`` tokens (the recipe's max_length). The
default shape is batch 1 at max_length, the shape a single request has. Core ML can plan every
enumerated shape for the Neural Engine, whereas a range-flexible input (``ct.RangeDim``) runs on
the Neural Engine only at its default shape, everything else on GPU or CPU (Apple's Core ML
engineers, developer.apple.com/forums/thread/724930; coremltools guide "Flexible Input Shapes").
The runner pads a batch to the next enumerated shape (masked tokens, zero rows) and drops the padding.

coremltools allows more than one enumerated input only from iOS 18 / macOS 15 on
(``_validate_enumerated_shape_inputs``), so an older ``deployment_target`` with several flexible
inputs gets bounded ranges with batch 1 at max_length as their default; ``notes["neural_engine"]``
(artifact.json) records which shapes the Neural Engine can plan either way.

Integer inputs become int32, the widest integer Core ML takes; the runner casts. The conversion runs
on Linux; prediction needs the Core ML framework, i.e. macOS, so here the saved package is checked
by ``verify_spec`` (names, shapes, op count, spec version) instead.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import ParityError, RecipeError, UnsupportedTargetError
from edgekd.export._common import (
    BATCH_AXIS,
    DEFAULT_MAX_BATCH,
    axis_bounds,
    check_inputs,
    export_examples,
    option,
    prepare_module,
    refuse_threads,
    runner_inputs,
    staged,
    unsupported,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register

PACKAGE = "model.mlpackage"
DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15",
                      "watchOS9", "tvOS16")
# Targets on which coremltools accepts several enumerated-shape inputs (iOS 18 generation).
MULTI_ENUMERATED = ("iOS18", "macOS15")
DEFAULT_BATCH_SIZES = (1, 8)  # bench.batch_sizes' default
_ANE_SOURCE = ("Core ML runs range-flexible inputs on the Neural Engine only at their default shape; each "
               "enumerated shape can run there (developer.apple.com/forums/thread/724930)")
_NOT_MACOS = "Core ML predicts only on macOS (this is {platform})"
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
    quantized = {"linear8": "linear8", "palettize": "palettize{palette_bits}"}  # quantize.coreml_mode
    requires = ("torch", "coremltools")
    extra = "coreml"
    applies_threads = False
    options = {
        "compute_precision": "fp16 (default; Neural Engine/GPU friendly) or fp32.",
        "deployment_target": f"Oldest OS the package runs on: {', '.join(DEPLOYMENT_TARGETS)} (default iOS18; "
                             "older targets get range shapes, Neural Engine at batch 1 only).",
        "max_batch": f"Largest batch the package accepts (default {DEFAULT_MAX_BATCH}).",
        "batch_sizes": f"Batch sizes enumerated besides 1 and max_batch (default {list(DEFAULT_BATCH_SIZES)}, "
                       "the bench's); each can be planned for the Neural Engine.",
        "max_sequence": "Sequence length of every shape (default: the examples' length, i.e. max_length).",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        precision = option(self.name, opts, "compute_precision", str, "fp16", choices=("fp16", "fp32"))
        target = option(self.name, opts, "deployment_target", str, "iOS18", choices=DEPLOYMENT_TARGETS)
        max_batch = option(self.name, opts, "max_batch", int, DEFAULT_MAX_BATCH, minimum=1)
        max_seq = option(self.name, opts, "max_sequence", int, None, minimum=1)
        batch_sizes = _batch_sizes(opts.get("batch_sizes", [b for b in DEFAULT_BATCH_SIZES if b <= max_batch]), max_batch)
        check_inputs(example_inputs, io, self.name)
        import coremltools as ct
        import torch

        module = prepare_module(module)
        examples = export_examples(example_inputs, io)
        _forget_stale_symbols()
        bounds = axis_bounds(io, {k: np.asarray(v) for k, v in example_inputs.items()}, max_batch, max_seq)
        flexible = [n for n in io.input_names if io.dynamic_axes.get(n)]
        enumerated = len(flexible) <= 1 or target in MULTI_ENUMERATED
        shapes = enumerated_shapes(io, examples, bounds, batch_sizes)
        default = shapes[0]  # batch 1 at max_sequence
        # Range fallback: one RangeDim per axis name, shared by the inputs (a symbol names one dimension).
        range_dims = {} if enumerated else {
            n: ct.RangeDim(lower_bound=lo, upper_bound=hi, default=lo if n == BATCH_AXIS else hi, symbol=n)
            for n, (lo, hi) in bounds.items()}
        inputs = []
        for name in io.input_names:
            dtype = np.int32 if np.issubdtype(examples[name].dtype, np.integer) else np.float32
            if name not in flexible:
                shape: Any = ct.Shape(list(examples[name].shape))
            elif enumerated:
                shape = ct.EnumeratedShapes(shapes=[list(s[name]) for s in shapes], default=list(default[name]))
            else:
                dims: list[Any] = list(default[name])
                for axis, axis_name in io.dynamic_axes[name].items():
                    dims[axis] = range_dims[axis_name]
                shape = ct.Shape(dims)
            inputs.append(ct.TensorType(name=name, shape=shape, dtype=dtype))
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
        ane = {"flexibility": "enumerated" if enumerated else "range", "why": _ANE_SOURCE,
               "plannable_shapes": [{k: list(v) for k, v in s.items()} for s in (shapes if enumerated else [default])]}
        if not enumerated:
            ane["note"] = (f"deployment_target {target} allows one enumerated input only and this model has "
                           f"{len(flexible)} flexible inputs: set deployment_target iOS18 or macOS15 to enumerate "
                           "every batch size")
        notes = {"spec": verify_spec(path, io), "deployment_target": target,
                 "bounds": {k: list(v) for k, v in bounds.items()}, "neural_engine": ane,
                 "predicts_on": "macOS only (Core ML); the spec is checked on every platform"}
        return ExportResult(self.name, path, [path], notes=notes, precision=precision)

    @classmethod
    def runs_here(cls) -> str | None:
        return None if sys.platform == "darwin" else _NOT_MACOS.format(platform=sys.platform)

    def load(self, path: Path, **runtime_opts: Any) -> CoreMLRunner:
        refuse_threads(self.name, runtime_opts, "Core ML schedules its own threads; compute_units (ALL, CPU_ONLY, "
                                                "CPU_AND_GPU, CPU_AND_NE) chooses the processors it may use")
        unknown = sorted(set(runtime_opts) - {"compute_units"})
        if unknown:
            raise UnsupportedTargetError(
                f"The Core ML runner does not accept option(s) {', '.join(unknown)}; allowed: compute_units."
            )
        why = self.runs_here()
        if why:
            raise UnsupportedTargetError(f"{why}: copy {Path(path).parent} to a Mac to run it; here its spec is "
                                         "checked with edgekd.export.coreml.verify_spec.")
        return CoreMLRunner(Path(path), runtime_opts.get("compute_units", "ALL"))


def _batch_sizes(value: Any, max_batch: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise RecipeError([f"export.options.coreml.batch_sizes must be a list of whole numbers, got {value!r}"])
    bad = [b for b in value if b < 1 or b > max_batch]
    if bad:
        raise RecipeError([f"export.options.coreml.batch_sizes {bad} outside 1..max_batch ({max_batch}): raise "
                           "max_batch or drop them"])
    return sorted({1, max_batch, *value})


def enumerated_shapes(io: ModelIO, examples: dict[str, np.ndarray], bounds: dict[str, tuple[int, int]],
                      batch_sizes: list[int]) -> list[dict[str, tuple[int, ...]]]:
    """One shape per batch size (ascending, so the first, batch 1, is the default): every dynamic
    axis other than the batch at its upper bound (the sequence at max_sequence)."""
    out = []
    for b in batch_sizes:
        shape = {}
        for name in io.input_names:
            dims = list(examples[name].shape)
            for axis, axis_name in io.dynamic_axes.get(name, {}).items():
                dims[axis] = b if axis_name == BATCH_AXIS else bounds[axis_name][1]
            shape[name] = tuple(int(d) for d in dims)
        out.append(shape)
    return out


def fit_to_shapes(arrays: dict[str, np.ndarray], shapes: list[dict[str, tuple[int, ...]]]
                  ) -> list[tuple[dict[str, np.ndarray], int]]:
    """Calls that run ``arrays`` on a package with enumerated ``shapes``: each is (inputs padded with
    zeros, i.e. masked tokens and empty rows, to the smallest shape that holds them; real rows).
    Batches above the largest shape run in slices of it; longer inputs than any shape are an error."""
    rows = len(next(iter(arrays.values())))
    by_batch = sorted(shapes, key=lambda s: next(iter(s.values()))[0])
    largest = next(iter(by_batch[-1].values()))[0]
    calls = []
    for start in range(0, rows, largest):
        part = {k: v[start:start + largest] for k, v in arrays.items()}
        n = len(next(iter(part.values())))
        fits = [s for s in by_batch
                if all(len(s[k]) == a.ndim and all(x <= m for x, m in zip(a.shape, s[k], strict=True))
                       for k, a in part.items())]
        if not fits:
            widest = {k: list(v) for k, v in by_batch[-1].items()}
            got = {k: list(a.shape) for k, a in part.items()}
            raise UnsupportedTargetError(f"Inputs of shapes {got} fit none of this Core ML package's shapes (largest "
                                         f"{widest}): re-export with a larger max_sequence.")
        shape = fits[0]
        padded = {k: np.pad(a, [(0, m - x) for x, m in zip(a.shape, shape[k], strict=True)]) for k, a in part.items()}
        calls.append((padded, n))
    return calls


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
        enumerated = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        inputs.append({"name": f.name, "dtype": _array_type(ct, f), "shape": list(arr.shape), "ranges": ranges,
                       "enumerated": enumerated})
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
        enumerated = by_name.get(name, {}).get("enumerated") or []
        for axis, axis_name in axes.items():
            if enumerated:  # the runner pads non-batch axes up to an enumerated shape; the batch must vary
                sizes = {s[axis] for s in enumerated if axis < len(s)}
                if axis_name == BATCH_AXIS and (len(sizes) < 2 or 1 not in sizes):
                    problems.append(f"axis {axis} of '{name}' enumerates batches {sorted(sizes)}, not 1 and more")
            elif axis >= len(ranges) or ranges[axis][0] == ranges[axis][1]:
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
        enumerated = {i["name"]: i["enumerated"] for i in info["inputs"] if i["enumerated"]}
        # Shape k of every enumerated input belongs together (coremltools requires equal counts).
        self._shapes = ([{n: tuple(v[k]) for n, v in enumerated.items()} for k in range(len(next(iter(enumerated.values()))))]
                        if enumerated else None)
        first = info["inputs"][0] if info["inputs"] else {}
        if self._shapes:
            self.max_batch = max(next(iter(s.values()))[0] for s in self._shapes)
        else:
            ranges = first.get("ranges") or []
            self.max_batch = int(ranges[0][1]) if ranges and ranges[0][1] > 0 else None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = dict(zip(self.input_names, runner_inputs(inputs, self.input_names, self._dtypes, "This Core ML model"),
                          strict=True))
        if not self._shapes:
            out = self.model.predict(arrays)
            return {n: np.asarray(out[n], dtype=np.float32) for n in self.output_names}
        fixed = {k: v for k, v in arrays.items() if all(k not in s for s in self._shapes)}
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for padded, rows in fit_to_shapes({k: v for k, v in arrays.items() if k not in fixed}, self._shapes):
            out = self.model.predict({**fixed, **padded})
            for n in self.output_names:
                parts[n].append(np.asarray(out[n], dtype=np.float32)[:rows])
        return {n: np.concatenate(v) for n, v in parts.items()}
