"""What the routes get per request: the loaded model, its engine, the settings and the metrics.

One dependency (``get_serving``) hands them over from ``app.state``, so tests can swap all of
it with ``app.dependency_overrides[get_serving]`` and the request path resolves one dependency,
not four.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from edgekd.serving.batching import InferenceEngine
from edgekd.serving.errors import DeadlineError, NotReadyError
from edgekd.serving.metrics import Metrics
from edgekd.serving.model import ServedModel
from edgekd.serving.settings import ServeSettings

T = TypeVar("T")


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


async def within_deadline(awaitable: Awaitable[T], settings: ServeSettings) -> T:
    """``awaitable``'s result, or 504 once the request has waited ``request_timeout_s`` for it.
    (``asyncio.timeout`` rather than ``wait_for``: no extra task per request.)"""
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            return await awaitable
    except TimeoutError:
        raise DeadlineError(f"the model did not answer within {settings.request_timeout_s:g} s "
                            "(request_timeout_s): retry, send fewer inputs, or use a less loaded server.") from None
