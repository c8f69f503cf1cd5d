"""Export targets, one module per target, registered by name (see base.py for the contracts)."""

from edgekd.export.base import (  # noqa: F401
    ExportResult,
    Exporter,
    ModelIO,
    Runner,
    get_exporter,
    read_artifact_meta,
    register,
    registered,
    write_artifact_meta,
)
