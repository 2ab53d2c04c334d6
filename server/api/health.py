"""GET /health (liveness: the model is loaded before the server accepts connections), GET /health/ready
(readiness: 503 while draining at shutdown) and
GET /metrics (Prometheus text exposition, server/metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import EngineDep, ServedDep

router = APIRouter()


@router.get("/health")
async def health(served: ServedDep, engine: EngineDep) -> dict:
    """Liveness: the process serves HTTP (the model is loaded before it accepts connections)."""
    return {"status": "ok", "model": served.name, "fingerprint": served.fingerprint}


@router.get("/health/ready", responses={503: {"description": "draining (shutting down): send elsewhere"}})
async def ready(request: Request, served: ServedDep) -> JSONResponse:
    """Readiness, for load balancers and Kubernetes probes: 200 while the server takes requests, 503 while it
    drains at shutdown."""
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "model": served.name}, status_code=503)
    return JSONResponse({"status": "ready", "model": served.name})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (server/metrics): request latencies, tokens, per-tenant counters, adapter caches,
    the engine's statistics, and the vLLM-named gauges the inference gateway's router reads."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
