"""Export targets, one module per target, registered by name (see base.py for the contracts).

Importing this package registers every target without importing torch: each target imports its
backend inside ``export()``/``load()``, so an ONNX artifact loads where torch is not installed.
"""

from edgekd.export import coreml as _coreml  # noqa: F401
from edgekd.export import executorch as _executorch  # noqa: F401
from edgekd.export import onnx as _onnx  # noqa: F401
from edgekd.export import tensorrt as _tensorrt  # noqa: F401
from edgekd.export import torchscript_lite as _torchscript_lite  # noqa: F401
from edgekd.export.base import (  # noqa: F401
    Exporter,
    ExportResult,
    ModelIO,
    Runner,
    get_exporter,
    read_artifact_meta,
    register,
    registered,
    write_artifact_meta,
)
