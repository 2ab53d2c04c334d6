"""GET /v1/models: the base model first, then every adapter the caller may use (OpenAI's list shape);
GET /v1/models/{id}: one of them."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.auth import CurrentPrincipal, TenancyDep
from server.api.deps import ServedDep, StoreDep
from server.errors import APIError
from server.protocol import ModelCard
from server.tenancy.access import resolve, shown_name, visible

router = APIRouter()


@router.get("/v1/models")
async def list_models(served: ServedDep, store: StoreDep, principal: CurrentPrincipal, tenancy: TenancyDep) -> dict:
    """Adapters appear under the name the caller uses for them: a plain id for its own, `owner/id` otherwise."""
    cards = [ModelCard(id=served.name, created=served.created, root=served.name)]
    public = await run_in_threadpool(tenancy.service.public_adapters)
    for info in await run_in_threadpool(visible, principal, store, public):
        cards.append(ModelCard(id=shown_name(principal, info.tenant, info.id), created=served.created,
                               root=served.name, parent=served.name, method=info.method, rank=info.rank))
    return {"object": "list", "data": [c.model_dump() for c in cards]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, served: ServedDep, store: StoreDep, principal: CurrentPrincipal,
                         tenancy: TenancyDep) -> dict:
    """OpenAI's retrieve: the base model, or an adapter the caller may use (else 404 model_not_found)."""
    if model == served.name:
        return ModelCard(id=served.name, created=served.created, root=served.name).model_dump()
    try:
        ref = await run_in_threadpool(resolve, principal, model, write=False, is_public=tenancy.service.is_public)
        info = await run_in_threadpool(store.info, ref.name)
    except (KeyError, ValueError):
        raise APIError(404, f"model {model!r} does not exist (see GET /v1/models)", param="model",
                       code="model_not_found") from None
    return ModelCard(id=ref.shown, created=served.created, root=served.name, parent=served.name,
                     method=info.method, rank=info.rank).model_dump()
