"""The adapter store over HTTP: PUT (the raw safetensors file as body), GET, list, DELETE."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import ConfigDep, EngineDep, StoreDep
from server.errors import APIError, as_api_error
from server.protocol import AdapterInfoOut
from server.store import AdapterInfo, check_id

router = APIRouter()


def _out(info: AdapterInfo) -> AdapterInfoOut:
    return AdapterInfoOut(id=info.id, method=info.method, rank=info.rank, bytes=info.bytes, sha256=info.sha256,
                          description=info.description)


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


@router.put("/adapters/{adapter_id}", response_model=AdapterInfoOut, status_code=201,
            responses={200: {"description": "an existing adapter was replaced"}})
async def put_adapter(adapter_id: str, request: Request, store: StoreDep, config: ConfigDep) -> JSONResponse:
    """Store (201) or replace (200) an adapter. The body is the raw safetensors file; it is validated against
    the base model before anything is written, so a refused upload leaves the store as it was."""
    try:
        check_id(adapter_id)
        data = await _read_body(request, config.http.max_adapter_bytes)
        info, created = await run_in_threadpool(store.put, adapter_id, data)
    except ValueError as exc:  # InvalidAdapterId, AdapterFormatError
        raise as_api_error(exc) from None
    return JSONResponse(_out(info).model_dump(), status_code=201 if created else 200)


@router.get("/adapters")
async def list_adapters(store: StoreDep) -> dict:
    infos = await run_in_threadpool(store.list)
    return {"object": "list", "data": [_out(i).model_dump() for i in infos]}


@router.get("/adapters/{adapter_id}", response_model=AdapterInfoOut)
async def get_adapter(adapter_id: str, store: StoreDep) -> AdapterInfoOut:
    try:
        stored = await run_in_threadpool(store.get, check_id(adapter_id))
    except (KeyError, ValueError) as exc:
        raise as_api_error(exc) from None
    return _out(stored.info)


@router.delete("/adapters/{adapter_id}")
async def delete_adapter(adapter_id: str, store: StoreDep, engine: EngineDep) -> dict:
    """Remove an adapter. Requests already running on it finish on the version they started with."""
    try:
        await run_in_threadpool(store.delete, check_id(adapter_id))
    except (KeyError, ValueError) as exc:
        raise as_api_error(exc) from None
    engine.forget_adapter(adapter_id)
    return {"id": adapter_id, "object": "adapter", "deleted": True}
