"""GET /health (liveness: the model is loaded before the server accepts connections), GET /health/ready
(readiness: 503 while draining at shutdown) and
GET /metrics (Prometheus text exposition of the engine's counters and gauges)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.deps import EngineDep, ServedDep

router = APIRouter()
PREFIX = "svdserve_"
GAUGES = {"running", "waiting", "resident_adapters", "merged"}  # everything else the engine counts up


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


def prometheus(stats: dict[str, float | int]) -> str:
    """One sample per stat: the engine's current state (GAUGES) as gauges, its running counts as counters."""
    lines = []
    for key in sorted(stats):
        value = float(stats[key])
        name = PREFIX + "".join(c if c.isalnum() or c == "_" else "_" for c in key)
        kind = "gauge" if key in GAUGES else "counter"
        lines += [f"# HELP {name} svdserve engine statistic {key}", f"# TYPE {name} {kind}",
                  f"{name} {_number(value)}"]
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() else repr(v)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(engine: EngineDep) -> PlainTextResponse:
    return PlainTextResponse(prometheus(engine.stats()), media_type="text/plain; version=0.0.4")
