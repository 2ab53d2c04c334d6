"""Who is asking: `Authorization: Bearer <key>` checked by a dependency each route declares.

`CurrentPrincipal` is any valid key (or, in open mode, everyone as the admin); `AdminPrincipal` is the admin
only (a tenant key is a 403). A generation route takes a `Meter` too, which holds the tenant's rate-limit lease.
`RateLimitHeaders` puts OpenAI's x-ratelimit-* headers on every response to a tenant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.tenancy.limiter import RateLimiter
from server.tenancy.service import Principal, TenancyService

OPEN_MODE_TTL_S = 1.0  # how long "no key exists yet" is believed; keys made by this process reset it


@dataclass
class Tenancy:
    """The tenants' service and this replica's rate limiter, on app.state.tenancy."""

    service: TenancyService
    open_allowed: bool = True  # False when listening beyond loopback: no key is then always a 401
    limiter: RateLimiter = field(default_factory=RateLimiter)
    weights: dict[str, int] = field(default_factory=dict)  # tenant -> fair-share weight, as last authenticated
    _open: tuple[float, bool] = (0.0, False)

    def weight(self, tenant: str) -> int:
        """The scheduler's view (no database access on the engine thread)."""
        return self.weights.get(tenant, 1)

    async def open_mode(self) -> bool:
        if not self.open_allowed:
            return False
        stamp, value = self._open
        if time.monotonic() - stamp > OPEN_MODE_TTL_S:
            value = await run_in_threadpool(self.service.open_mode)
            self._open = (time.monotonic(), value)
        return value

    def keys_changed(self) -> None:
        self._open = (0.0, False)


def get_tenancy(request: Request) -> Tenancy:
    return request.app.state.tenancy


TenancyDep = Annotated[Tenancy, Depends(get_tenancy)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else ""


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request, tenancy: TenancyDep) -> Principal:
    """The principal of the request's key. Unknown, revoked, expired or missing key: 401. In open mode any
    key or none is the admin (OpenAI clients always send some key)."""
    key = _bearer(request)
    principal = await run_in_threadpool(tenancy.service.authenticate, key) if key else None
    if principal is None:
        if await tenancy.open_mode():
            principal = tenancy.service.open_principal()
        elif key is None:
            raise _unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        else:
            raise _unauthorized("invalid API key: unknown, revoked or expired")
    request.state.principal = principal
    tenancy.weights[principal.tenant] = principal.weight
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


async def require_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise APIError(403, "this route needs the admin key", code="insufficient_permissions")
    return principal


AdminPrincipal = Annotated[Principal, Depends(require_admin)]


class RateLimitHeaders:
    """Adds x-ratelimit-{limit,remaining,reset}-{requests,tokens} to every response to a tenant whose quota
    sets those limits (read when the response starts, so they include this request's own charge)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                principal = scope.get("state", {}).get("principal")
                tenancy = getattr(scope["app"].state, "tenancy", None) if "app" in scope else None
                if principal is not None and tenancy is not None and not principal.is_admin:
                    extra = tenancy.limiter.headers(principal.tenant, principal.quota)
                    message["headers"] = list(message.get("headers", [])) + [
                        (k.encode(), v.encode()) for k, v in extra.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)
