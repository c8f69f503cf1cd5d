"""TorchScript lite (``.ptl``): ``torch.jit.trace`` saved for the PyTorch Mobile lite interpreter.

The legacy PyTorch Mobile path; ExecuTorch is its successor. ``optimize_for_mobile`` needs a torch
built with XNNPACK, so it is an option that fails clearly where the build lacks it (as torch's
CPU wheels from PyPI do) instead of being called blindly. The artifact carries its io as an extra
file (``edgekd_io.json``), so it loads without artifact.json.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import UnsupportedTargetError
from edgekd.export._common import (
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

MODULE = "model.ptl"
IO_FILE = "edgekd_io.json"
_OP_PATTERNS = (r"[Uu]nknown builtin op: ([\w:.]+)", r"Could not find any similar ops to ([\w:.]+)")
_ADVICE = "Replace the operator in the model, or export to 'executorch' instead."


@register
class TorchScriptLiteExporter(Exporter):
    name = "torchscript-lite"
    suffix = ".ptl"
    requires = ("torch",)
    applies_threads = False
    options = {
        "mobile_optimize": "Run torch.utils.mobile_optimizer.optimize_for_mobile (needs a torch built "
                           "with XNNPACK; default false).",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        mobile_optimize = option(self.name, opts, "mobile_optimize", bool, False)
        check_inputs(example_inputs, io, self.name)
        import torch
        import torch.backends.xnnpack

        if mobile_optimize and not torch.backends.xnnpack.enabled:
            raise UnsupportedTargetError(
                "export.options.torchscript-lite.mobile_optimize needs a torch built with XNNPACK, and this "
                f"torch ({torch.__version__}) was built without it: drop the option, or export to 'executorch'."
            )
        module = prepare_module(module)
        examples = export_examples(example_inputs, io)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, tuple(torch.from_numpy(examples[n]) for n in io.input_names),
                                         strict=False, _store_inputs=False)
            if mobile_optimize:
                from torch.utils.mobile_optimizer import optimize_for_mobile

                traced = optimize_for_mobile(traced)
        except Exception as e:  # the tracer's failure becomes one that names the operator
            raise unsupported(self.name, e, _OP_PATTERNS, _ADVICE) from e
        out_dir = Path(out_dir)
        with staged(out_dir) as tmp:
            traced._save_for_lite_interpreter(str(tmp / MODULE), _extra_files={IO_FILE: json.dumps(io.to_dict())})
        path = out_dir / MODULE
        notes = {"traced": True, "mobile_optimized": mobile_optimize,
                 "note": "traced: control flow that depends on input values is frozen at the example's path"}
        return ExportResult(self.name, path, [path], notes=notes)

    def load(self, path: Path, **runtime_opts: Any) -> TorchScriptLiteRunner:
        refuse_threads(self.name, runtime_opts, "the lite interpreter runs on torch's process-wide thread pool, "
                                                "which one runner must not resize for the whole process (set "
                                                "torch.set_num_threads or OMP_NUM_THREADS for the process instead)")
        unknown = sorted(set(runtime_opts))
        if unknown:
            raise UnsupportedTargetError(f"The TorchScript-lite runner does not accept option(s) {', '.join(unknown)}.")
        return TorchScriptLiteRunner(Path(path))


def read_io(path: Path) -> ModelIO:
    """The io stored inside a ``.ptl`` written by edgekd (a zip archive with an ``extra/`` folder)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"/extra/{IO_FILE}")), None)
            if name is None:
                raise UnsupportedTargetError(f"{path} was not written by edgekd (no {IO_FILE} inside): re-export it.")
            return ModelIO.from_dict(json.loads(zf.read(name)))
    except zipfile.BadZipFile as e:
        raise UnsupportedTargetError(f"{path} is not a TorchScript-lite file: re-export 'torchscript-lite'.") from e


class TorchScriptLiteRunner:
    """The lite interpreter (``torch.jit.mobile``). It runs on torch's global thread pool, which a
    runner must not resize for the whole process, so ``threads`` is refused at load (``refuse_threads``)."""

    def __init__(self, path: Path):
        import torch
        from torch.jit.mobile import _load_for_lite_interpreter

        if not path.is_file():
            raise UnsupportedTargetError(f"{path} does not exist: export the 'torchscript-lite' target first.")
        io = read_io(path)
        self._torch = torch
        self.module = _load_for_lite_interpreter(str(path))
        self.input_names, self.output_names = list(io.input_names), list(io.output_names)
        self._dtypes = dict(io.dtypes)
        self.device, self.threads = "cpu", None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        arrays = runner_inputs(inputs, self.input_names, self._dtypes, "This TorchScript-lite module")
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(a) for a in arrays))
        out = out if isinstance(out, (list, tuple)) else [out]
        return {n: o.detach().numpy().copy() for n, o in zip(self.output_names, out, strict=True)}
