"""A generation request's account: its tenant's rate-limit lease and its usage record.

`Meter` is a dependency of the generation routes. Taking it checks the tenant's requests-per-minute and
concurrency limits (429); `charge()` takes the request's token estimate (prompt + max_tokens per choice) before
it runs; `close(usage)` records the usage the response reports — before the response (or a stream's `[DONE]`)
goes out, so a client that has its answer finds it in `GET /v1/usage` — and gives back the lease.
A route that hands its meter to a stream sets `streaming`; the stream closes it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends
from starlette.concurrency import run_in_threadpool

from server.api.auth import CurrentPrincipal, Tenancy, TenancyDep
from server.errors import as_api_error
from server.protocol import Usage
from server.tenancy.limiter import Lease
from server.tenancy.service import Principal

log = logging.getLogger(__name__)


@dataclass
class Meter:
    tenancy: Tenancy
    principal: Principal
    lease: Lease | None  # None: the admin, whom no quota limits
    adapter: str | None = None  # canonical `tenant/id` the request used (None: the base model)
    user: str | None = None  # OpenAI's `user`: the client's end-user id, written on the request's usage log line
    streaming: bool = False
    closed: bool = False

    def charge(self, prompts: list[list[int]], max_tokens: int | None, n: int) -> None:
        """Take the most this request can use from the tokens-per-minute budget (429 / 400); with no
        max_tokens from the client, only the prompt — `close()` settles against the tokens used."""
        if self.lease is None:
            return
        try:
            self.lease.charge(sum(len(p) for p in prompts) + len(prompts) * n * (max_tokens or 0))
        except Exception as exc:
            raise as_api_error(exc) from None

    async def close(self, usage: Usage | None) -> None:
        """Record `usage` (None: nothing was served) and end the lease; idempotent, safe under cancellation."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            if self.lease is not None:
                self.lease.end(usage.total_tokens if usage is not None else 0)
            if usage is not None:
                log.info("usage tenant=%s adapter=%s user=%s prompt_tokens=%d completion_tokens=%d",
                         self.principal.tenant, self.adapter or "-", json.dumps(self.user), usage.prompt_tokens,
                         usage.completion_tokens)
                await run_in_threadpool(self.tenancy.service.record_usage, self.principal.tenant, self.adapter,
                                        self.principal.key_id, usage.prompt_tokens, usage.completion_tokens)


async def get_meter(principal: CurrentPrincipal, tenancy: TenancyDep) -> AsyncIterator[Meter]:
    lease = None
    if not principal.is_admin:
        try:
            lease = tenancy.limiter.begin(principal.tenant, principal.quota)
        except Exception as exc:
            raise as_api_error(exc) from None
    meter = Meter(tenancy, principal, lease)
    try:
        yield meter
    finally:
        if not meter.streaming:  # an error before the response, or a route that returned without closing
            await meter.close(None)


MeterDep = Annotated[Meter, Depends(get_meter)]
