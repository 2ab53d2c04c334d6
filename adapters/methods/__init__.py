"""Adapter methods, one module each; importing this package registers all of them in REGISTRY."""

from adapters.methods import lora, loraxs, osora, sorsa, vera  # noqa: F401  (registration)
from adapters.methods.base import REGISTRY, AdapterBatch, Bank, Method

__all__ = ["REGISTRY", "AdapterBatch", "Bank", "Method", "get_method"]


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
