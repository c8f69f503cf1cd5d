"""ExecuTorch: a ``.pte`` program lowered to XNNPACK, the PyTorch on-device runtime.

``torch.export`` (bounded dynamic batch and sequence) -> ``to_edge_transform_and_lower`` with the
XNNPACK partitioner -> ``to_executorch``. ExecuTorch plans memory ahead, so dynamic axes need an
upper bound (``max_batch``, ``max_sequence``). When the model cannot be exported with dynamic axes,
it is exported at a fixed shape (batch 1, ``max_sequence`` tokens) and the runner pads inputs to
that shape and runs row by row; ``notes`` says which happened.

The program carries its own io (a constant method ``edgekd_io``), so it loads without artifact.json.

After lowering, the program's planned batch is read back with the ExecuTorch runtime: XNNPACK
may keep a subgraph at the traced batch, and such a program runs that batch only. When the check
cannot run (no runtime here, a program without inputs), ``notes["planned_batch_check"]`` says why
instead of passing silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import RecipeError, UnsupportedTargetError
from edgekd.export._common import (
    BATCH_AXIS,
    DEFAULT_MAX_BATCH,
    SEQUENCE_AXIS,
    axis_bounds,
    check_inputs,
    export_examples,
    option,
    prepare_module,
    runner_inputs,
    staged,
    static_io,
    torch_dynamic_shapes,
    torch_inputs,
    unsupported,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register

PROGRAM = "model.pte"
IO_METHOD = "edgekd_io"
_OP_PATTERNS = (
    r"Operator (?:torch\._ops\.)?([\w.]+) is not in Core ATen opset",
    r"Missing out variants: \{'?([^'}]+)",
    r"[Kk]ernel (?:not found|missing) for (?:operator )?'?([\w.:]+)",
)
_ADVICE = ("Replace the operator in the model, or link a kernel for it into the ExecuTorch runtime "
           "(see EdgeCompileConfig._core_aten_ops_exception_list), or export to another target.")


@register
class ExecuTorchExporter(Exporter):
    name = "executorch"
    suffix = ".pte"
    requires = ("torch", "executorch")
    extra = "executorch"
    options = {
        "max_batch": f"Largest batch the program accepts (default {DEFAULT_MAX_BATCH}); memory is planned for it.",
        "max_sequence": "Longest sequence it accepts (default: the examples' length, i.e. max_length).",
        "dynamic": "Export dynamic batch/sequence axes (default true); false fixes batch 1 and max_sequence "
                   "(max_batch is then refused: the program runs batch 1, its runner row by row).",
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> None:
        """Besides the names: ``max_batch`` with ``dynamic: false`` is refused. A fixed-shape program runs batch 1
        (its runner feeds a batch row by row), so the bound would be recorded and never read."""
        super().check_options(opts)
        if opts.get("dynamic") is False and opts.get("max_batch") is not None:
            raise RecipeError([
                f"export.options.executorch.max_batch: {opts['max_batch']!r} with dynamic: false (the recipe's, or "
                "the task's default where the recipe leaves dynamic unset) does nothing: a fixed-shape program runs "
                "batch 1 (its runner feeds a batch row by row). Drop max_batch, or set "
                "export.options.executorch.dynamic: true to export a batch axis up to it"])

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        max_batch = option(self.name, opts, "max_batch", int, DEFAULT_MAX_BATCH, minimum=1)
        max_seq = option(self.name, opts, "max_sequence", int, None, minimum=1)
        dynamic = option(self.name, opts, "dynamic", bool, True)
        check_inputs(example_inputs, io, self.name)
        import torch

        module = prepare_module(module)
        examples = export_examples(example_inputs, io)
        bounds = axis_bounds(io, {k: np.asarray(v) for k, v in example_inputs.items()}, max_batch, max_seq)
        notes: dict[str, Any] = {"bounds": {k: list(v) for k, v in bounds.items()}}
        program = None
        if dynamic:
            try:
                with torch.no_grad():
                    program = torch.export.export(module, (), torch_inputs(examples, io.input_names),
                                                  dynamic_shapes=torch_dynamic_shapes(io, bounds))
            except Exception as e:  # data-dependent guards and the like: fall back to a fixed shape
                _raise_if_bound_too_large(e, bounds)
                notes["dynamic_failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        artifact_io = io
        buffer = None
        if program is not None:
            buffer = self._lower(program, io, notes)
            planned, why_not = _planned_batch(buffer)
            notes["planned_batch_check"] = ({"checked": True, "planned_batch": planned} if why_not is None
                                            else {"checked": False, "reason": why_not})
            if planned is not None and "batch" in bounds and planned < bounds["batch"][1]:
                # XNNPACK kept some subgraphs at the traced batch: such a program runs that batch only.
                notes["dynamic_failed"] = (f"the lowered program was planned for batch {planned} only, not up to "
                                           f"{bounds['batch'][1]}: exported with fixed shapes instead")
                buffer = None
        if buffer is None:
            artifact_io = static_io(io)
            fixed = _fixed_examples(examples, io, bounds)
            try:
                with torch.no_grad():
                    program = torch.export.export(module, (), torch_inputs(fixed, io.input_names))
            except Exception as e:
                raise unsupported(self.name, e, _OP_PATTERNS, _ADVICE) from e
            notes["static_shapes"] = {n: list(a.shape) for n, a in fixed.items()}
            # The bounds the program really has: batch 1, every other axis at the size it is padded to.
            if dynamic:
                notes["requested_bounds"] = notes["bounds"]
            notes["bounds"] = {k: [1, 1] if k == BATCH_AXIS else [hi, hi] for k, (_, hi) in bounds.items()}
            buffer = self._lower(program, artifact_io, notes)
        notes["dynamic"] = artifact_io is io
        out_dir = Path(out_dir)
        with staged(out_dir) as tmp:
            (tmp / PROGRAM).write_bytes(buffer)
        path = out_dir / PROGRAM
        return ExportResult(self.name, path, [path], notes=notes,
                            io=None if artifact_io is io else artifact_io)

    @staticmethod
    def _lower(program: Any, artifact_io: ModelIO, notes: dict[str, Any]) -> bytes:
        """XNNPACK-delegated ExecuTorch program bytes, the IO description stored as a constant method."""
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            edge = to_edge_transform_and_lower(
                program, partitioner=[XnnpackPartitioner()],
                constant_methods={IO_METHOD: json.dumps(artifact_io.to_dict())},
            )
            notes["delegation"] = _delegation(edge)
            return edge.to_executorch().buffer
        except Exception as e:  # the backend's failure becomes one that names the operator
            raise unsupported(ExecuTorchExporter.name, e, _OP_PATTERNS, _ADVICE) from e

    def load(self, path: Path, **runtime_opts: Any) -> ExecuTorchRunner:
        unknown = sorted(set(runtime_opts) - {"threads"})
        if unknown:
            raise UnsupportedTargetError(f"The ExecuTorch runner does not accept option(s) {', '.join(unknown)}.")
        threads = runtime_opts.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UnsupportedTargetError(f"The ExecuTorch runner's threads must be a whole number >= 1, got {threads!r}.")
        return ExecuTorchRunner(Path(path), threads)


def _raise_if_bound_too_large(exc: Exception, bounds: dict[str, tuple[int, int]]) -> None:
    """torch.export refuses a bound above what the model accepts (e.g. its position embeddings);
    that is a wrong option, not a reason to fall back to fixed shapes."""
    fixes = re.findall(r"(\w+) = Dim\('(\w+)'(?:, min=\d+)?, max=(\d+)\)", str(exc))
    problems = []
    for _, axis, limit in fixes:
        if axis in bounds and bounds[axis][1] > int(limit):
            key = "max_sequence" if axis == SEQUENCE_AXIS else f"max_{axis}"
            problems.append(f"export.options.executorch.{key}: the model accepts at most {limit} along "
                            f"'{axis}', got {bounds[axis][1]}; set it to {limit} or less")
    if problems:
        raise RecipeError(problems) from exc


def _planned_batch(buffer: bytes) -> tuple[int | None, str | None]:
    """(the batch the program's memory is planned for, i.e. its first input's leading size, None)
    or (None, why it could not be read here). Only the expected failures are caught and reported;
    anything else is a bug and raises."""
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        return None, f"the ExecuTorch runtime does not import here ({e}); the program's planned batch is unchecked"
    try:
        method = Runtime.get().load_program(buffer).load_method("forward")
    except RuntimeError as e:  # the runtime refused the program (e.g. a kernel not linked into it)
        return None, f"the ExecuTorch runtime could not load the program ({str(e).strip()[:300]})"
    meta = method.metadata
    if meta.num_inputs() == 0:
        return None, "the program's forward method has no inputs"
    sizes = tuple(meta.input_tensor_meta(0).sizes())
    if not sizes:
        return None, "the program's first input is a scalar: it has no batch axis"
    return int(sizes[0]), None


def _fixed_examples(examples: dict[str, np.ndarray], io: ModelIO, bounds: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Batch 1, every other dynamic axis zero-padded (or cut) to its upper bound."""
    out = {}
    for name in io.input_names:
        arr = examples[name][:1]
        for axis, axis_name in io.dynamic_axes.get(name, {}).items():
            if axis != 0:
                arr = _pad_axis(arr, axis, bounds[axis_name][1])
        out[name] = np.ascontiguousarray(arr)
    return out


def _pad_axis(arr: np.ndarray, axis: int, size: int) -> np.ndarray:
    if arr.shape[axis] >= size:
        return np.take(arr, range(size), axis=axis)
    widths = [(0, 0)] * arr.ndim
    widths[axis] = (0, size - arr.shape[axis])
    return np.pad(arr, widths)


def _delegation(edge: Any) -> dict[str, int]:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    return {"xnnpack_subgraphs": int(info.num_delegated_subgraphs),
            "delegated_nodes": int(info.num_delegated_nodes),
            "portable_nodes": int(info.num_non_delegated_nodes)}


def set_threads(threads: int) -> int:
    """Resize the ExecuTorch runtime's thread pool (the one XNNPACK kernels run on) and return the
    size it reports afterwards. The pool is process-wide: the last runner loaded with ``threads``
    sets it for every ExecuTorch program in the process."""
    try:
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count,
            _unsafe_reset_threadpool,
        )
    except ImportError as e:  # a runtime build without these (experimental) bindings
        raise UnsupportedTargetError(
            f"This ExecuTorch runtime cannot set its thread count from Python ({e}): remove the threads "
            "option (serve.threads / bench.threads) for the 'executorch' target."
        ) from None
    _unsafe_reset_threadpool(int(threads))
    got = int(_threadpool_get_thread_count())
    if got != threads:
        raise UnsupportedTargetError(
            f"The ExecuTorch runtime was asked for {threads} threads but runs {got}: set threads to at most "
            "the number of CPU cores."
        )
    return got


class ExecuTorchRunner:
    """The ExecuTorch runtime's Python bindings (torch tensors in, torch tensors out). ``threads``
    resizes the runtime's (process-wide) thread pool; None leaves it as the runtime chose."""

    def __init__(self, path: Path, threads: int | None = None):
        import torch
        from executorch.runtime import Runtime

        if not path.is_file():
            raise UnsupportedTargetError(f"{path} does not exist: export the 'executorch' target first.")
        self._torch = torch
        self.threads = set_threads(threads) if threads is not None else None
        program = Runtime.get().load_program(str(path))
        if IO_METHOD not in program.method_names:
            raise UnsupportedTargetError(f"{path} was not written by edgekd (no '{IO_METHOD}' method): re-export it.")
        io = ModelIO.from_dict(json.loads(program.load_method(IO_METHOD).execute([])[0]))
        self.method = program.load_method("forward")
        self.input_names, self.output_names = list(io.input_names), list(io.output_names)
        self.io, self.device = io, "cpu"
        self._dtypes = dict(io.dtypes)
        meta = self.method.metadata
        # Planned sizes: upper bounds of dynamic axes, exact sizes of a fixed-shape program.
        self._max = {n: tuple(meta.input_tensor_meta(i).sizes()) for i, n in enumerate(self.input_names)}
        self.static = not any(io.dynamic_axes.get(n) for n in self.input_names)
        self.max_batch = None if self.static else min(s[0] for s in self._max.values())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = runner_inputs(inputs, self.input_names, self._dtypes, "This program")
        arrays = dict(zip(self.input_names, cast, strict=True))
        if self.static:
            return self._run_padded(arrays)
        for name, arr in arrays.items():
            if any(s > m for s, m in zip(arr.shape, self._max[name], strict=False)):
                raise UnsupportedTargetError(
                    f"Input '{name}' of shape {list(arr.shape)} exceeds the program's planned maximum "
                    f"{list(self._max[name])}: re-export with larger max_batch/max_sequence."
                )
        return self._execute(arrays)

    def _execute(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        outs = self.method.execute([torch.from_numpy(arrays[n]) for n in self.input_names])
        return {n: o.detach().numpy().copy() for n, o in zip(self.output_names, outs, strict=True)}

    def _run_padded(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A fixed-shape program: one row at a time, zero-padded (or cut) to the planned shape."""
        rows = len(next(iter(arrays.values())))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for r in range(rows):
            row = {}
            for name, arr in arrays.items():
                x = arr[r:r + 1]
                if any(s > m for s, m in zip(x.shape, self._max[name], strict=False)):
                    raise UnsupportedTargetError(
                        f"Input '{name}' of shape {list(arr.shape)} is longer than this fixed-shape program's "
                        f"{list(self._max[name])}: re-export with a larger max_sequence."
                    )
                for axis in range(1, x.ndim):
                    x = _pad_axis(x, axis, self._max[name][axis])
                row[name] = np.ascontiguousarray(x)
            for n, v in self._execute(row).items():
                parts[n].append(v)
        return {n: np.concatenate(v, axis=0) for n, v in parts.items()}
