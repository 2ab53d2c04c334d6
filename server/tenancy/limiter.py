"""Rate and concurrency limits per tenant, in this replica's memory: token buckets for requests and tokens per
minute (full at start, refilled continuously, as OpenAI's limits behave) and a count of requests in flight.

A generation request takes a `Lease`: `begin()` takes one request from the request bucket and a concurrency
place, `charge()` takes its token estimate (prompt tokens + max_tokens per choice, or the prompt alone when the client
set no max_tokens) before it runs, `end()` settles the estimate against the tokens used and gives back the
concurrency place. A lease that is never ended (a stream
whose generator never ran) gives its place back when it is garbage-collected.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from server.tenancy.quotas import Quota


class RateLimited(Exception):
    """A limit is reached for now: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class NeverAdmitted(ValueError):
    """The request alone exceeds a limit, so waiting would not help: HTTP 400."""


@dataclass
class _Bucket:
    level: float
    stamp: float

    def refill(self, limit: int, now: float) -> None:
        self.level = min(float(limit), self.level + (now - self.stamp) * limit / 60.0)
        self.stamp = now


@dataclass
class _TenantState:
    requests: _Bucket
    tokens: _Bucket
    in_flight: int = 0


@dataclass
class Lease:
    limiter: RateLimiter
    tenant: str
    quota: Quota
    charged: int = 0
    ended: bool = False
    _finalizer: object = field(default=None, repr=False)

    def charge(self, tokens: int) -> None:
        """Take `tokens` from the tenant's tokens-per-minute bucket. Raises RateLimited, NeverAdmitted."""
        self.limiter._charge(self, tokens)

    def end(self, used_tokens: int | None = None) -> None:
        """Give back the concurrency place and the unused part of the charge (idempotent)."""
        if not self.ended:
            self.ended = True
            if self._finalizer is not None:
                self._finalizer.detach()
            self.limiter._end(self.tenant, self.quota, self.charged, used_tokens)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _TenantState] = {}

    def _get(self, tenant: str, quota: Quota, now: float) -> _TenantState:
        st = self._state.get(tenant)
        if st is None:
            st = self._state[tenant] = _TenantState(
                _Bucket(float(quota.requests_per_minute or 0), now), _Bucket(float(quota.tokens_per_minute or 0), now))
        if quota.requests_per_minute is not None:
            st.requests.refill(quota.requests_per_minute, now)
        if quota.tokens_per_minute is not None:
            st.tokens.refill(quota.tokens_per_minute, now)
        return st

    def begin(self, tenant: str, quota: Quota) -> Lease:
        """A lease for one generation request. Raises RateLimited."""
        with self._lock:
            st = self._get(tenant, quota, self.clock())
            limit = quota.max_concurrent_requests
            if limit is not None and st.in_flight >= limit:
                raise RateLimited(f"too many concurrent requests: the limit is {limit} "
                                  "(max_concurrent_requests); retry when one finishes", 1)
            rpm = quota.requests_per_minute
            if rpm is not None:
                if rpm == 0:
                    raise NeverAdmitted("this tenant's requests_per_minute quota is 0")
                if st.requests.level < 1:
                    raise RateLimited(f"rate limit reached: {rpm} requests per minute (requests_per_minute)",
                                      (1 - st.requests.level) * 60 / rpm)
                st.requests.level -= 1
            st.in_flight += 1
        lease = Lease(self, tenant, quota)
        lease._finalizer = weakref.finalize(lease, self._end, tenant, quota, 0, 0)
        return lease

    def _charge(self, lease: Lease, tokens: int) -> None:
        tpm = lease.quota.tokens_per_minute
        if tpm is None or tokens <= 0:
            return
        if tokens > tpm:
            raise NeverAdmitted(f"this request may use {tokens} tokens (prompt + max_tokens per choice), more "
                                f"than the tokens_per_minute quota of {tpm}: lower max_tokens or n")
        with self._lock:
            st = self._get(lease.tenant, lease.quota, self.clock())
            if st.tokens.level < tokens:
                raise RateLimited(f"rate limit reached: {tpm} tokens per minute (tokens_per_minute)",
                                  (tokens - st.tokens.level) * 60 / tpm)
            st.tokens.level -= tokens
            lease.charged += tokens

    def _end(self, tenant: str, quota: Quota, charged: int, used: int | None) -> None:
        with self._lock:
            st = self._state.get(tenant)
            if st is None:
                return
            st.in_flight = max(0, st.in_flight - 1)
            if used is not None and used != charged and quota.tokens_per_minute is not None:
                # settle: give back what the estimate overcharged, or take what it missed (the bucket may go
                # below zero, and the tenant's next requests wait for it to refill)
                st.tokens.level = min(float(quota.tokens_per_minute), st.tokens.level + charged - used)

    def headers(self, tenant: str, quota: Quota) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the tenant's current state (limits that are set only)."""
        out: dict[str, str] = {}
        with self._lock:
            st = self._get(tenant, quota, self.clock())
            for kind, limit, bucket in (("requests", quota.requests_per_minute, st.requests),
                                        ("tokens", quota.tokens_per_minute, st.tokens)):
                if limit is None:
                    continue
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                reset = (limit - bucket.level) * 60 / limit if limit else 0.0
                out[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, reset):.3f}s"
        return out
