"""Which adapter a name means to a principal, and whether it may see it.

A principal names its home tenant's adapters by plain id, and another tenant's as `owner/id`. A tenant may
read and use its own adapters and public ones, and write only its own; the admin may do anything. Whatever a
principal may not see answers exactly as an adapter that does not exist (AdapterNotFound → 404, same message),
so a tenant never learns that another tenant's adapter exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.store import AdapterInfo, AdapterNotFound, AdapterStore, split_name
from server.tenancy.service import Principal


@dataclass(frozen=True)
class Resolved:
    name: str  # canonical `tenant/id`, what the store and the engine use
    tenant: str
    id: str
    shown: str  # as the principal named it (response `model`, usage records)


def resolve(principal: Principal, name: str, *, write: bool,
            is_public: Callable[[str, str], bool]) -> Resolved:
    """The adapter `name` means to `principal`. Raises InvalidAdapterId (400) for a malformed name and
    AdapterNotFound (404) for one it may not access — whether or not it exists."""
    owner, adapter_id = split_name(name) if "/" in name else (principal.tenant, split_name(name)[1])
    allowed = principal.is_admin or owner == principal.tenant or (not write and is_public(owner, adapter_id))
    if not allowed:
        raise AdapterNotFound(name)
    return Resolved(f"{owner}/{adapter_id}", owner, adapter_id, shown_name(principal, owner, adapter_id))


def shown_name(principal: Principal, owner: str, adapter_id: str) -> str:
    return adapter_id if owner == principal.tenant else f"{owner}/{adapter_id}"


def visible(principal: Principal, store: AdapterStore, public: set[tuple[str, str]]) -> list[AdapterInfo]:
    """The adapters a principal may list: every one for the admin; its own, then the public ones, for a
    tenant (reading only those from the store)."""
    if principal.is_admin:
        return store.list()
    out = store.list(principal.tenant)
    for owner, adapter_id in sorted(public):
        if owner != principal.tenant:
            try:
                out.append(store.info(f"{owner}/{adapter_id}"))
            except (AdapterNotFound, ValueError):  # deleted meanwhile
                continue
    return out
