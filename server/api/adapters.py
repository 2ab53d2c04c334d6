"""The adapter store over HTTP: PUT (the raw safetensors file as body), GET, list, PATCH (visibility, admin),
DELETE. Names are resolved for the caller (server.tenancy.access): another tenant's adapter is a 404."""

from __future__ import annotations

import logging
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from server.api.auth import AdminPrincipal, CurrentPrincipal, TenancyDep
from server.api.deps import ConfigDep, EngineDep, StoreDep
from server.errors import APIError, as_api_error
from server.protocol import AdapterInfoOut
from server.store import AdapterInfo, AdapterNotFound, StorageLimit, Upload
from server.tenancy.access import Resolved, resolve, shown_name, visible
from server.tenancy.service import Principal

log = logging.getLogger(__name__)
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


UPLOAD_WRITE_BATCH = 1 << 18  # bytes gathered before one write in a worker thread (256 KiB: 4 concurrent
# 32 MiB uploads measured ~12 MiB peak RSS growth, ~18 MiB with 1 MiB batches)
RETRY_AFTER_S = 2
CLOSE = {"Connection": "close"}  # an upload refused before its body was read: the connection cannot be reused


class UploadBudget:
    """Bytes of adapter uploads being received or validated at once, all clients together (process-wide,
    `--max-upload-bytes-in-flight`). Used only on the event loop, so it needs no lock."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0


class _Reservation:
    """One upload's share of the budget: its declared Content-Length at once, or grown as bytes arrive."""

    def __init__(self, budget: UploadBudget):
        self.budget, self.held = budget, 0

    def grow_to(self, n: int) -> None:
        if n <= self.held:
            return
        b = self.budget
        if n > b.cap:
            raise APIError(413, f"adapter upload of {n} bytes exceeds the {b.cap} bytes that may be uploaded at "
                                "once (--max-upload-bytes-in-flight)", code="payload_too_large", headers=CLOSE)
        if b.used + n - self.held > b.cap:
            raise APIError(503, f"too many adapter bytes are being uploaded at once (at most {b.cap}, "
                                f"--max-upload-bytes-in-flight); retry in {RETRY_AFTER_S} s", code="uploads_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S), **CLOSE})
        b.used += n - self.held
        self.held = n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


def _budget(request: Request, cap: int) -> UploadBudget:
    state = request.app.state
    budget = getattr(state, "upload_budget", None)
    if budget is None:
        budget = state.upload_budget = UploadBudget(cap)
    return budget


def _too_large(limit: int, size: int | None = None) -> APIError:
    what = f"adapter file of {size} bytes" if size is not None else "adapter file"
    return APIError(413, f"{what} exceeds the limit of {limit} bytes (--max-adapter-bytes)",
                    code="payload_too_large", headers=CLOSE)


async def _receive(request: Request, upload: Upload, reservation: _Reservation, limit: int, timeout: float) -> None:
    """The request body into `upload`, chunk by chunk (written and hashed in a worker thread, a batch at a
    time): 413 past `limit` bytes, 503 past the process-wide budget, 408 when nothing arrives for `timeout`
    seconds, 400 when the client goes away."""
    batch: list[bytes] = []
    batched = received = 0
    more = True
    while more:
        with anyio.move_on_after(timeout) as waited:
            message = await request.receive()
        if waited.cancelled_caught:
            raise APIError(408, f"the upload stalled: nothing was received for {timeout:g} s "
                                "(--upload-timeout-seconds)", code="request_timeout", headers=CLOSE)
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if not chunk:
            continue
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        reservation.grow_to(received)
        batch.append(chunk)
        batched += len(chunk)
        if batched >= UPLOAD_WRITE_BATCH or not more:
            data, batch, batched = b"".join(batch), [], 0
            await run_in_threadpool(upload.write, data)
    if not received:
        raise APIError(400, "empty body: send the adapter's safetensors file as the request body",
                       code="invalid_adapter")
    await run_in_threadpool(upload.finish)


SEND_RAW = "send the raw file: curl -X PUT --data-binary @adapter.safetensors URL"


def _check_media_type(content_type: str) -> None:
    """`curl -F` sends a multipart form, not the file: say how to send it instead of reporting a broken
    safetensors file. (`--data-binary` and `-d` both say form-urlencoded; see `_hint`.)"""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        raise APIError(400, f"the body is a multipart form (curl -F): {SEND_RAW}", code="invalid_adapter")


def _hint(err: APIError, content_type: str) -> APIError:
    """A file that does not parse and came as form data was most likely sent with `curl -d`, which strips
    newlines (and so corrupts a binary file)."""
    if err.code == "invalid_adapter" and content_type.startswith("application/x-www-form-urlencoded"):
        err.message += f" (sent with curl -d? -d strips newlines; {SEND_RAW})"
    return err


@router.put("/adapters/{name:path}", response_model=AdapterInfoOut, status_code=201,
            responses={200: {"description": "an existing adapter was replaced"}})
async def put_adapter(name: str, request: Request, principal: CurrentPrincipal, tenancy: TenancyDep,
                      store: StoreDep, config: ConfigDep) -> JSONResponse:
    """Store (201) or replace (200) an adapter of the caller's tenant. The body is the raw safetensors file,
    streamed to a temporary file in the tenant's directory (never held in memory whole); it is validated
    against the base model and the tenant's storage quota before it is renamed into place, so a refused,
    stalled or interrupted upload leaves the store as it was."""
    ref = await _resolve(principal, name, tenancy, write=True)
    if principal.is_admin and not await run_in_threadpool(tenancy.service.tenant_exists, ref.tenant):
        raise APIError(404, f"tenant {ref.tenant!r} not found", param="adapter_id", code="tenant_not_found")
    q = principal.quota
    limit = None if principal.is_admin else StorageLimit(q.max_adapters, q.max_storage_bytes)
    http = config.http
    _check_media_type(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > http.max_adapter_bytes:
        raise _too_large(http.max_adapter_bytes, declared)
    if declared == 0:
        raise APIError(400, "empty body: send the adapter's safetensors file as the request body",
                       code="invalid_adapter")
    reservation = _Reservation(_budget(request, http.max_upload_bytes_in_flight))
    upload = None
    try:
        if declared is not None:
            if limit is not None:  # early, so a file that cannot fit is not sent for nothing
                await run_in_threadpool(store.check_quota, ref.name, declared, limit)
            reservation.grow_to(declared)
        upload = await run_in_threadpool(store.begin_upload, ref.name)
        await _receive(request, upload, reservation, http.max_adapter_bytes, http.upload_timeout_seconds)
        info, created = await run_in_threadpool(store.put_file, ref.name, upload.path, upload.sha256, upload.size,
                                                limit)
    except ClientDisconnect:
        log.info("adapter upload %s: the client disconnected; nothing stored", ref.name)
        raise APIError(400, "the client disconnected before the upload was complete",
                       code="client_disconnected") from None
    except Exception as exc:  # InvalidAdapterId, AdapterFormatError, StorageQuotaExceeded, StoreFull; others re-raised
        raise _hint(as_api_error(exc), request.headers.get("content-type", "")) from None
    finally:
        with anyio.CancelScope(shield=True):
            if upload is not None:
                await run_in_threadpool(upload.close)  # removes the temporary file unless it was stored
        reservation.release()
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
    info = await _stored(store.info, ref, name)  # the index: no parse
    public = await run_in_threadpool(tenancy.service.is_public, ref.tenant, ref.id)
    return _out(info, principal, public)


class AdapterPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    visibility: Literal["public", "private"]


@router.patch("/adapters/{name:path}", response_model=AdapterInfoOut)
async def patch_adapter(name: str, body: AdapterPatch, principal: AdminPrincipal, tenancy: TenancyDep,
                        store: StoreDep) -> AdapterInfoOut:
    """Admin only: make an adapter public (every tenant may read and use it as `owner/id`) or private."""
    ref = await _resolve(principal, name, tenancy, write=True)
    info = await _stored(store.info, ref, name)
    await run_in_threadpool(tenancy.service.set_public, ref.tenant, ref.id, body.visibility == "public", principal)
    return _out(info, principal, body.visibility == "public")


@router.delete("/adapters/{name:path}")
async def delete_adapter(name: str, principal: CurrentPrincipal, tenancy: TenancyDep, store: StoreDep,
                         engine: EngineDep) -> dict:
    """Remove an adapter. Requests already running on it finish on the version they started with."""
    ref = await _resolve(principal, name, tenancy, write=True)
    try:
        version = (await _stored(store.info, ref, name)).sha256
    except APIError as exc:
        if exc.code != "invalid_adapter":
            raise
        version = None  # a file that is not a servable adapter can still be removed
    await _stored(store.delete, ref, name)
    engine.forget_adapter(ref.name)
    await run_in_threadpool(tenancy.service.drop_public, ref.tenant, ref.id)
    await run_in_threadpool(tenancy.service.audit, principal, "adapter.delete", ref.name,
                            {"sha256": version})
    return {"id": ref.shown, "object": "adapter", "deleted": True}
