"""What the routes get per request: the loaded model, its engine, the settings and the metrics.

One dependency (``get_serving``) hands them over from ``app.state``, so tests can swap all of
it with ``app.dependency_overrides[get_serving]`` and the request path resolves one dependency,
not four.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from edgekd.serving.batching import InferenceEngine
from edgekd.serving.errors import NotReadyError
from edgekd.serving.metrics import Metrics
from edgekd.serving.model import ServedModel
from edgekd.serving.settings import ServeSettings


@dataclass(frozen=True)
class Serving:
    settings: ServeSettings
    model: ServedModel
    engine: InferenceEngine
    metrics: Metrics


async def get_serving(request: Request) -> Serving:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise NotReadyError("the model is not loaded (yet): retry in a moment.")
    return serving
