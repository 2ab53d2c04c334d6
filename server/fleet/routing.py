"""The ingress's routing key: which adapter, as `tenant/id`, a request will run with.

Ray Serve's model multiplexing routes on one string per request. A request's adapter is named by `adapter_id`
or `model` in its body, relative to the tenant of its API key (a plain id is the caller's own adapter, `owner/id`
another tenant's public one), so the key is resolved here exactly as a replica will resolve it
(`server.tenancy.access.resolve`) — two tenants' adapters of the same id never share a key, and the same adapter
named two ways (`id`, `tenant/id`) always does. The base model, other routes and anything that does not resolve
get the empty key (no affinity): the replica answers those, errors included, itself.

Keys are authenticated against the shared tenants' database and remembered for `ttl_s`: routing only needs the
tenant, and every replica authenticates each request again, so a key revoked a moment ago is refused there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from server.store import AdapterNotFound, InvalidAdapterId
from server.tenancy.access import resolve
from server.tenancy.service import Principal, TenancyService

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_REMEMBERED_KEYS = 10_000


def bearer(authorization: bytes | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, key = authorization.decode("latin-1").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def named_adapter(body: bytes, base_model: str | None) -> str | None:
    """`adapter_id`, else `model` unless it is the base model's name; None when neither names an adapter or
    the body is not a JSON object (the replica answers the 400)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    for field_name in ("adapter_id", "model"):
        name = doc.get(field_name)
        if isinstance(name, str) and name and name != base_model:
            return name
    return None


@dataclass
class Principals:
    """API key → principal, through the tenants' service, remembered for `ttl_s` seconds."""

    service: TenancyService
    open_allowed: bool = True
    ttl_s: float = 5.0
    _known: dict[str, tuple[float, Principal | None]] = field(default_factory=dict)
    _open: tuple[float, bool] = (0.0, False)

    def of(self, key: str | None) -> Principal | None:
        """The key's principal; in open mode (no key exists, loopback only) everyone is the admin."""
        now = time.monotonic()
        principal = None
        if key is not None:
            seen = self._known.get(key)
            if seen is None or now - seen[0] > self.ttl_s:
                if len(self._known) >= MAX_REMEMBERED_KEYS:
                    self._known.clear()
                seen = (now, self.service.authenticate(key))
                self._known[key] = seen
            principal = seen[1]
        if principal is None and self._open_mode(now):
            principal = self.service.open_principal()
        return principal

    def _open_mode(self, now: float) -> bool:
        if not self.open_allowed:
            return False
        stamp, value = self._open
        if now - stamp > 1.0:
            self._open = (now, value := self.service.open_mode())
        return value


def routing_key(principals: Principals, method: str, path: str, authorization: bytes | None, body: bytes,
                base_model: str | None) -> str:
    """`tenant/id` of the adapter a generation request will use, or "" (no affinity). Blocking (it may read
    the database): call it from a worker thread."""
    if method != "POST" or path not in GENERATION_PATHS:
        return ""
    name = named_adapter(body, base_model)
    if name is None:
        return ""
    principal = principals.of(bearer(authorization))
    if principal is None:
        return ""
    try:
        return resolve(principal, name, write=False, is_public=principals.service.is_public).name
    except (InvalidAdapterId, AdapterNotFound):
        return ""
