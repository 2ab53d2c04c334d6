"""The rate limiter on a hand-driven clock: token buckets per tenant, concurrency, refunds, headers."""

from __future__ import annotations

import gc

import pytest

from server.tenancy.limiter import NeverAdmitted, RateLimited, RateLimiter
from server.tenancy.quotas import Quota


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter():
    clock = Clock()
    return RateLimiter(clock), clock


def test_requests_per_minute_refill_continuously():
    lim, clock = limiter()
    q = Quota(requests_per_minute=3)
    for _ in range(3):
        lim.begin("a", q).end()
    with pytest.raises(RateLimited) as exc:
        lim.begin("a", q)
    assert exc.value.retry_after == 20  # one request comes back every 60/3 s
    clock.t += 20
    lim.begin("a", q).end()
    lim.begin("b", q).end()  # another tenant has its own bucket


def test_tokens_are_charged_before_and_refunded_after():
    lim, clock = limiter()
    q = Quota(tokens_per_minute=100)
    lease = lim.begin("a", q)
    lease.charge(80)
    assert lim.headers("a", q)["x-ratelimit-remaining-tokens"] == "20"
    lease.end(used_tokens=30)  # 50 of the estimate were not used
    assert lim.headers("a", q)["x-ratelimit-remaining-tokens"] == "70"
    under = lim.begin("a", q)
    under.charge(10)
    under.end(used_tokens=90)  # the estimate missed 80: the bucket goes below zero
    assert lim.headers("a", q)["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited) as exc:
        lim.begin("a", q).charge(1)
    assert exc.value.retry_after == 13  # 70 - 10 + 10 - 90 = -20: 21 tokens at 100/60 a second
    clock.t += 13
    with pytest.raises(RateLimited):
        lim.begin("a", q).charge(71)
    with pytest.raises(NeverAdmitted):
        lim.begin("a", q).charge(101)  # could never be served: a 400, not a 429


def test_concurrency_is_released_by_end_or_by_garbage_collection():
    lim, _ = limiter()
    q = Quota(max_concurrent_requests=2)
    first, second = lim.begin("a", q), lim.begin("a", q)
    with pytest.raises(RateLimited):
        lim.begin("a", q)
    first.end()
    first.end()  # idempotent
    third = lim.begin("a", q)
    del second, third  # never ended: a stream whose generator never ran
    gc.collect()
    lim.begin("a", q)
    lim.begin("a", q)


@pytest.mark.parametrize("quota,expected", [
    (Quota(), {}),
    (Quota(requests_per_minute=10), {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "10",
                                     "x-ratelimit-reset-requests": "0.000s"}),
    (Quota(tokens_per_minute=5), {"x-ratelimit-limit-tokens": "5", "x-ratelimit-remaining-tokens": "5",
                                  "x-ratelimit-reset-tokens": "0.000s"}),
])
def test_headers_name_only_the_limits_that_are_set(quota, expected):
    lim, _ = limiter()
    assert lim.headers("a", quota) == expected


def test_zero_requests_per_minute_is_never_admitted():
    lim, _ = limiter()
    with pytest.raises(NeverAdmitted):
        lim.begin("a", Quota(requests_per_minute=0))
