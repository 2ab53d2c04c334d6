"""The admin API (admin key only): tenants, their keys, and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.api.auth import AdminPrincipal, TenancyDep
from server.api.deps import EngineDep, StoreDep
from server.errors import APIError, as_api_error
from server.tenancy.service import DEFAULT_TENANT

router = APIRouter(prefix="/admin", tags=["admin"])
STRICT = ConfigDict(extra="forbid", strict=True)


class TenantCreate(BaseModel):
    model_config = STRICT
    name: str = Field(..., description="1-64 characters of A-Z a-z 0-9 . _ -")
    quota: dict[str, int | None] | None = Field(None, description="overrides of the server's default quota")
    weight: int = Field(1, description="share in fair admission, 1-1000")


class TenantPatch(BaseModel):
    model_config = STRICT
    quota: dict[str, int | None] | None = Field(None, description="entries to change; null = the server default")
    weight: int | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: Annotated[str, Field(max_length=500, strict=True)] | None = None
    expires_at: datetime | None = Field(None, description="ISO 8601; the key stops working then")


async def _call(fn, *args):
    """A service call in the thread pool, its errors (not found, conflict, invalid) as API errors."""
    try:
        return await run_in_threadpool(fn, *args)
    except Exception as exc:
        raise as_api_error(exc) from None


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    out = await _call(tenancy.service.create_tenant, body.name, body.quota, body.weight, admin)
    return out


@router.get("/tenants")
async def list_tenants(admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    return {"object": "list", "data": await _call(tenancy.service.list_tenants)}


@router.get("/tenants/{name}")
async def get_tenant(name: str, admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    return await _call(tenancy.service.get_tenant, name)


@router.patch("/tenants/{name}")
async def patch_tenant(name: str, body: TenantPatch, admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    out = await _call(tenancy.service.update_tenant, name, body.quota, body.weight, admin)
    return out


@router.delete("/tenants/{name}")
async def delete_tenant(name: str, admin: AdminPrincipal, tenancy: TenancyDep, store: StoreDep,
                        engine: EngineDep) -> dict:
    """Remove a tenant, its keys and its adapters; its usage and audit records stay."""
    if name == DEFAULT_TENANT:
        raise APIError(400, "the default tenant cannot be deleted", param="name")
    await _call(tenancy.service.get_tenant, name)  # 404 before anything is removed
    await _call(tenancy.service.delete_tenant, name, admin)  # keys first: its clients stop at once
    for adapter_id in await _call(store.delete_tenant, name):
        engine.forget_adapter(f"{name}/{adapter_id}")
    tenancy.keys_changed()
    return {"name": name, "object": "tenant", "deleted": True}


@router.post("/tenants/{name}/keys", status_code=201)
async def create_key(name: str, body: KeyCreate, admin: AdminPrincipal, tenancy: TenancyDep) -> JSONResponse:
    """A new key for the tenant. The answer's `key` is the only time the key is shown."""
    out = await _call(tenancy.service.create_key, name, body.description, body.expires_at, admin)
    tenancy.keys_changed()
    return JSONResponse(out, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/tenants/{name}/keys")
async def list_keys(name: str, admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    return {"object": "list", "data": await _call(tenancy.service.list_keys, name)}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, admin: AdminPrincipal, tenancy: TenancyDep) -> dict:
    """Revoke a key; the next request that sends it is a 401."""
    out = await _call(tenancy.service.revoke_key, key_id, admin)
    tenancy.keys_changed()
    return out


@router.get("/audit")
async def audit(admin: AdminPrincipal, tenancy: TenancyDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                tenant: str | None = None, action: str | None = None) -> dict:
    """Newest first: who (key id, actor), when, what (action, target, detail)."""
    return {"object": "list", "data": await _call(tenancy.service.audit_events, limit, tenant, action)}
