"""Per-tenant limits: server-wide defaults (settings) overridden per tenant (its `quota` JSON).

None means unlimited. Storage limits are checked against the store when an adapter is written; rates and
concurrency by `server.tenancy.limiter.RateLimiter` in each replica.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Quota:
    max_adapters: int | None = None  # adapters stored
    max_storage_bytes: int | None = None  # bytes of adapter files stored
    requests_per_minute: int | None = None  # generation requests
    tokens_per_minute: int | None = None  # prompt + completion tokens
    max_concurrent_requests: int | None = None  # generation requests in flight

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def override(self, values: dict) -> Quota:
        """These defaults with `values` (a tenant's quota) on top; raises ValueError on a bad entry."""
        return replace(self, **check_quota(values))

    def as_dict(self) -> dict:
        return asdict(self)


def check_quota(values: object) -> dict[str, int | None]:
    """A tenant's quota object, validated: known names, each a non-negative integer or null."""
    if not isinstance(values, dict):
        raise ValueError("quota must be an object")
    unknown = sorted(set(values) - set(Quota.names()))
    if unknown:
        raise ValueError(f"unknown quota {', '.join(unknown)}; known: {', '.join(Quota.names())}")
    for name, v in values.items():
        if v is not None and (type(v) is not int or not 0 <= v < 2**63):
            raise ValueError(f"quota {name} must be a non-negative integer or null (unlimited)")
    return dict(values)
