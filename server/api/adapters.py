"""The adapter store over HTTP: PUT (the raw safetensors file as body), GET, list, PATCH (visibility, admin),
DELETE. Names are resolved for the caller (server.tenancy.access): another tenant's adapter is a 404."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from server.api.auth import AdminPrincipal, CurrentPrincipal, TenancyDep
from server.api.deps import ConfigDep, EngineDep, StoreDep
from server.errors import APIError, as_api_error
from server.protocol import AdapterInfoOut
from server.store import AdapterInfo, AdapterNotFound, StorageLimit
from server.tenancy.access import Resolved, resolve, shown_name, visible
from server.tenancy.service import Principal

router = APIRouter()


def _out(info: AdapterInfo, principal: Principal, public: bool) -> AdapterInfoOut:
    return AdapterInfoOut(id=shown_name(principal, info.tenant, info.id), method=info.method, rank=info.rank,
                          bytes=info.bytes, sha256=info.sha256, description=info.description, owner=info.tenant,
                          visibility="public" if public else "private")


async def _resolve(principal: Principal, name: str, tenancy, *, write: bool) -> Resolved:
    try:
        return await run_in_threadpool(resolve, principal, name, write=write, is_public=tenancy.service.is_public)
    except (KeyError, ValueError) as exc:
        raise as_api_error(exc) from None


async def _stored(fn, ref: Resolved, name: str):
    """A store call on `ref`; a missing adapter is reported under the name the client gave."""
    try:
        return await run_in_threadpool(fn, ref.name)
    except AdapterNotFound:
        raise as_api_error(AdapterNotFound(name)) from None
    except ValueError as exc:
        raise as_api_error(exc) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"adapter file of {int(declared)} bytes exceeds the limit of {limit} bytes "
                            "(--max-adapter-bytes)", code="payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"adapter file exceeds the limit of {limit} bytes (--max-adapter-bytes)",
                           code="payload_too_large")
        chunks.append(chunk)
    if not size:
        raise APIError(400, "empty body: send the adapter's safetensors file as the request body",
                       code="invalid_adapter")
    return b"".join(chunks)


@router.put("/adapters/{name:path}", response_model=AdapterInfoOut, status_code=201,
            responses={200: {"description": "an existing adapter was replaced"}})
async def put_adapter(name: str, request: Request, principal: CurrentPrincipal, tenancy: TenancyDep,
                      store: StoreDep, config: ConfigDep) -> JSONResponse:
    """Store (201) or replace (200) an adapter of the caller's tenant. The body is the raw safetensors file;
    it is validated against the base model and the tenant's storage quota before anything is written, so a
    refused upload leaves the store as it was."""
    ref = await _resolve(principal, name, tenancy, write=True)
    if principal.is_admin and not await run_in_threadpool(tenancy.service.tenant_exists, ref.tenant):
        raise APIError(404, f"tenant {ref.tenant!r} not found", param="adapter_id", code="tenant_not_found")
    q = principal.quota
    limit = None if principal.is_admin else StorageLimit(q.max_adapters, q.max_storage_bytes)
    try:
        data = await _read_body(request, config.http.max_adapter_bytes)
        info, created = await run_in_threadpool(store.put, ref.name, data, limit)
    except Exception as exc:  # InvalidAdapterId, AdapterFormatError, StorageQuotaExceeded; others re-raised
        raise as_api_error(exc) from None
    await run_in_threadpool(tenancy.service.audit, principal, "adapter.put" if created else "adapter.replace",
                            ref.name, {"sha256": info.sha256, "bytes": info.bytes, "method": info.method})
    public = await run_in_threadpool(tenancy.service.is_public, ref.tenant, ref.id)
    return JSONResponse(_out(info, principal, public).model_dump(), status_code=201 if created else 200)


@router.get("/adapters")
async def list_adapters(principal: CurrentPrincipal, tenancy: TenancyDep, store: StoreDep) -> dict:
    """The caller's adapters and the public ones (the admin: every tenant's)."""
    public = await run_in_threadpool(tenancy.service.public_adapters)
    infos = await run_in_threadpool(visible, principal, store, public)
    return {"object": "list", "data": [_out(i, principal, (i.tenant, i.id) in public).model_dump() for i in infos]}


@router.get("/adapters/{name:path}", response_model=AdapterInfoOut)
async def get_adapter(name: str, principal: CurrentPrincipal, tenancy: TenancyDep, store: StoreDep) -> AdapterInfoOut:
    ref = await _resolve(principal, name, tenancy, write=False)
    stored = await _stored(store.get, ref, name)
    public = await run_in_threadpool(tenancy.service.is_public, ref.tenant, ref.id)
    return _out(stored.info, principal, public)


class AdapterPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    visibility: Literal["public", "private"]


@router.patch("/adapters/{name:path}", response_model=AdapterInfoOut)
async def patch_adapter(name: str, body: AdapterPatch, principal: AdminPrincipal, tenancy: TenancyDep,
                        store: StoreDep) -> AdapterInfoOut:
    """Admin only: make an adapter public (every tenant may read and use it as `owner/id`) or private."""
    ref = await _resolve(principal, name, tenancy, write=True)
    stored = await _stored(store.get, ref, name)
    await run_in_threadpool(tenancy.service.set_public, ref.tenant, ref.id, body.visibility == "public", principal)
    return _out(stored.info, principal, body.visibility == "public")


@router.delete("/adapters/{name:path}")
async def delete_adapter(name: str, principal: CurrentPrincipal, tenancy: TenancyDep, store: StoreDep,
                         engine: EngineDep) -> dict:
    """Remove an adapter. Requests already running on it finish on the version they started with."""
    ref = await _resolve(principal, name, tenancy, write=True)
    stored = await _stored(store.get, ref, name)
    await _stored(store.delete, ref, name)
    engine.forget_adapter(ref.name)
    await run_in_threadpool(tenancy.service.drop_public, ref.tenant, ref.id)
    await run_in_threadpool(tenancy.service.audit, principal, "adapter.delete", ref.name,
                            {"sha256": stored.version})
    return {"id": ref.shown, "object": "adapter", "deleted": True}
