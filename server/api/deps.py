"""What routes get injected: the engine, the store, the tokenizer and the served model's name.

All of it lives on `app.state`, set by the lifespan in server/app.py; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from server.config import Config
from server.engine import Engine
from server.store import Store


@dataclass(frozen=True)
class Served:
    """The loaded base model as the API names it."""

    name: str  # the base model's id in /v1/models and in responses
    fingerprint: str
    created: int  # when the server loaded it (OpenAI's `created`)
    max_model_len: int


def _state(request: Request, name: str) -> Any:
    return getattr(request.app.state, name)


def get_engine(request: Request) -> Engine:
    return _state(request, "engine")


def get_store(request: Request) -> Store:
    return _state(request, "store")


def get_tokenizer(request: Request) -> Any:
    return _state(request, "tokenizer")


def get_served(request: Request) -> Served:
    return _state(request, "served")


def get_config(request: Request) -> Config:
    return _state(request, "config")


EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[Store, Depends(get_store)]
TokenizerDep = Annotated[Any, Depends(get_tokenizer)]
ServedDep = Annotated[Served, Depends(get_served)]
ConfigDep = Annotated[Config, Depends(get_config)]
