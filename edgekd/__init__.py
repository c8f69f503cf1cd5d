"""edgekd: take a big accurate model, ship a small fast one to the edge.

The Python API (edgekd/api.py), imported on first use so that ``import edgekd`` stays light:

    run = edgekd.run("default", prune={"keep_params": 0.5})     # the pipeline, as `edgekd run`
    student = edgekd.distill(teacher, data=(texts, labels))      # distillation alone, no run folder
    edgekd.load("runs/default/export/onnx-int8").predict(["a fine film"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "Run", "__version__", "distill", "load", "run"]

if TYPE_CHECKING:
    from edgekd.api import Model, Run, distill, load, run


def __getattr__(name: str) -> Any:
    if name in ("run", "distill", "load", "Run", "Model"):
        from edgekd import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgekd' has no attribute '{name}'")
