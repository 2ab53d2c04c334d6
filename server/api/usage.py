"""GET /v1/usage: requests and tokens per tenant, adapter and hour — a tenant's own, or (admin) everyone's."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.auth import CurrentPrincipal, TenancyDep
from server.errors import as_api_error
from server.tenancy.service import parse_time

router = APIRouter()


@router.get("/v1/usage")
async def usage(principal: CurrentPrincipal, tenancy: TenancyDep, start: str | None = None, end: str | None = None,
                tenant: str | None = None) -> dict:
    """`start` (inclusive) and `end` (exclusive) are ISO 8601 times (UTC unless a zone is given). A tenant
    sees only its own usage whatever `tenant` says; the admin may filter by `tenant`."""
    try:
        t0, t1 = parse_time(start, "start"), parse_time(end, "end")
        who = tenant if principal.is_admin else principal.tenant
        rows = await run_in_threadpool(tenancy.service.usage, t0, t1, who)
    except Exception as exc:
        raise as_api_error(exc) from None
    totals = {k: sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return {"object": "list", "data": rows, "totals": totals}
