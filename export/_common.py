"""Helpers shared by the export targets: option checking, example inputs, dynamic axes, and turning a
backend's conversion failure into an error that names the operator.

Nothing here imports torch at module level: the ONNX runner (used by the torch-free server) imports
this module too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import DataError, RecipeError, UnsupportedTargetError
from edgekd.export.base import ModelIO

# Axis names with their own size option; any other dynamic axis keeps the example's size as its bound.
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
DEFAULT_MAX_BATCH = 32

_MISSING = object()


def option(target: str, opts: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None,
           *, choices: Iterable[Any] | None = None, minimum: int | None = None) -> Any:
    """One export option, type-checked; a wrong value is a RecipeError naming the recipe key."""
    value = opts.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    key = f"export.options.{target}.{name}"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; an int option must not silently accept true/false.
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise RecipeError([f"{key}: expected {names}, got {value!r}"])
    if choices is not None and value not in (allowed := list(choices)):
        raise RecipeError([f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}"])
    if minimum is not None and value < minimum:
        raise RecipeError([f"{key}: must be at least {minimum}, got {value!r}"])
    return value


def refuse_threads(target: str, runtime_opts: dict[str, Any], why: str) -> None:
    """For a runner that does not apply intra-op threads (``Exporter.applies_threads`` false): a ``threads``
    given is refused, never accepted and ignored; ``threads=None`` (unset) is dropped."""
    threads = runtime_opts.pop("threads", None)
    if threads is not None:
        raise UnsupportedTargetError(
            f"The '{target}' runner does not take threads (got {threads!r}): {why}. Leave threads unset for "
            f"this target (serve.threads / --threads, bench.threads, edgekd.load(threads=...)).")


def check_inputs(example_inputs: dict[str, np.ndarray], io: ModelIO, target: str) -> None:
    missing = [n for n in io.input_names if n not in example_inputs]
    if missing:
        raise DataError(
            f"Export to '{target}' needs example inputs {io.input_names}; missing {missing}. "
            "Pass the task's example_inputs() (real preprocessed examples)."
        )


def export_examples(example_inputs: dict[str, np.ndarray], io: ModelIO, rows: int = 2) -> dict[str, np.ndarray]:
    """A few example rows in the declared dtypes, at least 2 along every dynamic axis.

    torch.export specialises axes of size 0 or 1 to constants, so a batch of one example would
    freeze the batch axis; repeating rows (or the last column) keeps such axes dynamic.
    """
    out = {}
    for name in io.input_names:
        arr = np.asarray(example_inputs[name])
        if name in io.dtypes:
            arr = arr.astype(io.dtypes[name], copy=False)
        arr = arr[:rows]
        for axis in io.dynamic_axes.get(name, {}):
            if arr.shape[axis] < 2:
                arr = np.concatenate([arr, np.take(arr, [-1], axis=axis)], axis=axis)
        out[name] = np.ascontiguousarray(arr)
    return out


def torch_inputs(arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    import torch

    return {n: torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names}


def prepare_module(module: Any) -> Any:
    """Exports capture inference, so the module is put in eval mode (no dropout) and left there:
    restoring train mode would also flip sub-modules the caller had deliberately put in eval mode."""
    module.eval()
    return module


def axis_bounds(io: ModelIO, examples: dict[str, np.ndarray], max_batch: int,
                max_sequence: int | None) -> dict[str, tuple[int, int]]:
    """(lower, upper) size of every named dynamic axis, for targets that plan memory ahead.

    ``batch`` goes up to ``max_batch``; ``sequence`` up to ``max_sequence`` (default: the example's
    length, which the task pads to its max_length); any other dynamic axis stays at the example's size.
    """
    bounds: dict[str, tuple[int, int]] = {}
    for name in io.input_names:
        for axis, axis_name in io.dynamic_axes.get(name, {}).items():
            size = int(examples[name].shape[axis])
            if axis_name == BATCH_AXIS:
                hi = max_batch
            elif axis_name == SEQUENCE_AXIS:
                hi = max_sequence or size
            else:
                hi = size
            lo, prev_hi = bounds.get(axis_name, (1, hi))
            bounds[axis_name] = (lo, min(hi, prev_hi))
    return bounds


def torch_dynamic_shapes(io: ModelIO, bounds: dict[str, tuple[int, int]] | None = None) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for torch.export: one shared ``Dim`` per axis name (bounded when given)."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for name in io.input_names:
        spec = {}
        for axis, axis_name in io.dynamic_axes.get(name, {}).items():
            if axis_name not in dims:
                lo_hi = (bounds or {}).get(axis_name)
                dims[axis_name] = Dim(axis_name, min=lo_hi[0], max=lo_hi[1]) if lo_hi else Dim(axis_name)
            spec[int(axis)] = dims[axis_name]
        shapes[name] = spec
    return shapes


def static_io(io: ModelIO) -> ModelIO:
    """The same io with every input axis fixed (outputs keep nothing dynamic either)."""
    return ModelIO(list(io.input_names), list(io.output_names), {}, dict(io.dtypes))


def unsupported(target: str, exc: BaseException, patterns: Iterable[str], advice: str) -> UnsupportedTargetError:
    """An UnsupportedTargetError naming the target and, when the backend's message reveals it, the operator."""
    text = str(exc)
    op = None
    for pat in patterns:
        m = re.search(pat, text)
        if m:
            op = ".".join(g for g in m.groups() if g)
            break
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    if op:
        msg = f"Export target '{target}' cannot convert operator '{op}'. {advice}"
    else:
        msg = f"Export target '{target}' could not convert the model ({type(exc).__name__}: {first[:300]}). {advice}"
    err = UnsupportedTargetError(msg)
    err.target = target  # type: ignore[attr-defined]
    err.operator = op  # type: ignore[attr-defined]
    return err


def runner_inputs(inputs: dict[str, np.ndarray], names: list[str], dtypes: dict[str, Any], where: str) -> list[np.ndarray]:
    """Inputs in ``names`` order, cast to the artifact's declared dtypes; missing names are an error."""
    missing = [n for n in names if n not in inputs]
    if missing:
        raise DataError(f"{where} needs inputs {names}; missing {missing}.")
    out = []
    for n in names:
        arr = np.asarray(inputs[n])
        if n in dtypes and arr.dtype != dtypes[n]:
            arr = arr.astype(dtypes[n])
        out.append(np.ascontiguousarray(arr))
    return out


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes of ordinary files (0644 / 0755 under the usual
    umask 022). Temporary folders and files are created 0700/0600, and copies keep their source's mode,
    so without this an export folder mounted into a container is unreadable by its (non-owner) user."""
    mask = current_umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A hidden staging folder inside ``out_dir``; on success every entry moves into ``out_dir`` by
    rename, on failure the staging folder is removed. A crash never leaves a half-written artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        yield tmp
        publish_modes(tmp)
        for entry in sorted(tmp.iterdir()):
            dest = out_dir / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
