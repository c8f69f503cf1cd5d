"""What a task family gives the server, found through ``edgekd.registry.TASKS``.

The loader reads artifact.json's ``task`` and asks that family (``SERVING`` in its package's
``serve`` module, e.g. ``edgekd/tasks/text/serve.py``) for everything the server does differently
per task: the codec, the ``POST /predict`` handler and its OpenAPI body, the Open Inference Protocol
(v2) tensors, the batch limit, and the answers of ``edgekd.load(...).predict``. Routes, batcher,
metrics and the v2 transports ask nothing else about the task, so a new family serves by writing its
own ``serve.py``. A family's ``serve`` module imports no torch (the serving image has none).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.errors import StageError
from edgekd.registry import TASKS

if TYPE_CHECKING:
    from fastapi import Request
    from pydantic import BaseModel
    from starlette.types import Scope

    from edgekd.export.base import Runner
    from edgekd.serving.batching import InferenceEngine
    from edgekd.serving.codec import Codec
    from edgekd.serving.settings import ServeSettings

# The routes' per-request ``edgekd.serving.context.Serving`` and v2_core's ``Tensor``, ``Output`` and
# ``ModelSpec`` are named in comments only: both modules look families up here.
Serving = Any


@dataclass(frozen=True)
class ServeFamily:
    """One task family as the server sees it."""

    task: str  # artifact.json's ``task``
    accepts: str  # what POST /predict takes ("texts", "images"): named in errors and /metadata
    # (folder, artifact.json, runner, settings) -> the codec; may run one input to check the artifact
    codec: Callable[[Path, dict[str, Any], Runner, ServeSettings], Codec]
    predict: Callable[[Request, Serving], Awaitable[BaseModel]]  # POST /predict
    response_model: type[BaseModel]  # what POST /predict answers
    request_models: tuple[type[BaseModel], ...]  # the JSON bodies it reads, for the OpenAPI components
    # POST /predict's OpenAPI "requestBody" content (media type -> schema) and "parameters"
    openapi_content: dict[str, Any]
    v2_spec: Callable[[Any], Any]  # codec -> the v2 inputs, outputs and parameters (a v2_core.ModelSpec)
    v2_infer: Callable[[dict[str, Any], Serving], Awaitable[dict[str, Any]]]  # Tensors by name -> Outputs by name
    max_batch: Callable[[ServeSettings], int]  # most inputs in one request (Triton's max_batch_size)
    # edgekd.load(...).predict: (codec, engine, inputs, batch_size, options) -> one answer per input
    local_predict: Callable[[Any, InferenceEngine, Any, int, dict[str, Any]], list[Any]]
    openapi_parameters: list[dict[str, Any]] = field(default_factory=list)
    # An answer straight from the ASGI middleware for the common request shape (None: always the route).
    fast_predict: Callable[[Scope, bytes], Awaitable[bytes | None]] | None = None

    def openapi(self) -> dict[str, Any]:
        """POST /predict's request body and parameters when this family's model is served."""
        return {"requestBody": {"required": True, "content": self.openapi_content},
                "parameters": self.openapi_parameters}


def serve_family(task: str) -> ServeFamily:
    """The serving side of the family registered as ``task``."""
    if task not in TASKS:
        raise StageError(f"task '{task}' is not a registered task family, so this server cannot serve it; "
                         f"it serves {', '.join(TASKS)}.")
    module = f"{TASKS[task]}.serve"
    try:
        found = importlib.import_module(module).SERVING
    except (ModuleNotFoundError, AttributeError) as e:
        raise StageError(f"task family '{task}' has no serving side ({module}.SERVING: {e}); "
                         "a family serves by defining SERVING in its package's serve.py.") from e
    if found.task != task:
        raise StageError(f"{module}.SERVING says task '{found.task}', but it is registered as '{task}'.")
    return found


def serve_families() -> list[ServeFamily]:
    """Every registered family that serves (for the OpenAPI document, which describes them all)."""
    return [serve_family(task) for task in TASKS]
