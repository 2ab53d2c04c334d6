"""GET /v1/models: the base model first, then every stored adapter (OpenAI's list shape)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.deps import ServedDep, StoreDep
from server.protocol import ModelCard

router = APIRouter()


@router.get("/v1/models")
async def list_models(served: ServedDep, store: StoreDep) -> dict:
    cards = [ModelCard(id=served.name, created=served.created, root=served.name)]
    for info in await run_in_threadpool(store.list):
        cards.append(ModelCard(id=info.id, created=served.created, root=served.name, parent=served.name,
                               method=info.method, rank=info.rank))
    return {"object": "list", "data": [c.model_dump() for c in cards]}
