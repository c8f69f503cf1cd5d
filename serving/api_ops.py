"""Service routes: /health for probes, /metadata for people and dashboards, /metrics for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from edgekd.serving.api_predict import ERRORS
from edgekd.serving.context import Serving, get_serving
from edgekd.serving.errors import NotReadyError
from edgekd.serving.http import require_api_key
from edgekd.serving.schemas import HealthResponse, MetadataResponse

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse, responses={503: ERRORS[503]},
            summary="Liveness and readiness in one")
async def health(request: Request, serving: Serving = Depends(get_serving)) -> HealthResponse:
    if not request.app.state.ready:
        raise NotReadyError("the server is shutting down.")
    return HealthResponse(status="ok", model=serving.model.name, target=serving.model.target)


@router.get("/metadata", response_model=MetadataResponse, dependencies=[Depends(require_api_key)],
            responses={401: ERRORS[401], 503: ERRORS[503]},
            summary="What is served: model, task, target, runtime, labels, accuracy and parity figures")
async def metadata(serving: Serving = Depends(get_serving)) -> MetadataResponse:
    model, engine = serving.model, serving.engine
    return MetadataResponse(
        model=model.name,
        target=model.target,
        platform=model.platform,
        runtime=model.runtime,
        labels=model.codec.labels,
        **model.codec.facts(),
        batching={
            "enabled": engine.batching,
            "max_batch_size": engine.max_batch_size,
            "max_wait_ms": engine.max_wait_ms,
            "workers": engine.workers,
        },
        artifact=model.meta,
        run=model.manifest_figures,
        versions=model.versions,
    )


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
