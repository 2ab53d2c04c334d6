"""The fleet on a local Ray cluster: two replicas of the tiny model behind Ray Serve, sharing PostgreSQL and the
store. Which replica answered is the `x-svdserve-replica` header of each response; the replicas' own counters
are read from GET /fleet/replicas. Each replica runs at most 2 requests at once (--max-batch-size 2, Ray's
max_ongoing_requests), so a burst of requests for one adapter spills onto the other replica."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.fleet

PROMPT = "The fleet says"


def _client(fleet) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, timeout=120)


@pytest.fixture(scope="module")
def tenant(fleet) -> dict[str, str]:
    """A tenant's key, made through the fleet (any replica; the database is shared)."""
    with _client(fleet) as c:
        r = c.post("/admin/tenants", json={"name": "acme"}, headers=fleet.admin())
        assert r.status_code == 201, r.text
        r = c.post("/admin/tenants/acme/keys", json={}, headers=fleet.admin())
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}


def complete(fleet, headers: dict, model: str, max_tokens: int = 8) -> httpx.Response:
    with _client(fleet) as c:
        return c.post("/v1/completions", headers=headers, json={
            "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "prompt_logprobs": 0})


def burst(fleet, headers: dict, model: str, n: int = 8, max_tokens: int = 48) -> list[httpx.Response]:
    """n requests at once: more than one replica runs (2), so some go to the other replica."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: complete(fleet, headers, model, max_tokens), range(n)))


def answered_by(responses: list[httpx.Response]) -> set[str]:
    return {r.headers["x-svdserve-replica"] for r in responses}


def put(fleet, headers: dict, name: str, seed: int) -> httpx.Response:
    with _client(fleet) as c:
        return c.put(f"/adapters/{name}", content=fleet.adapter_bytes(seed), headers=headers)


def signature(r: httpx.Response) -> list[float]:
    """The logprobs of the prompt's tokens: which adapter version ran, robust to the batch a request shared
    (greedy text of a random tiny model can flip at a near-tie when the batch changes the float rounding)."""
    assert r.status_code == 200, r.text
    return [next(iter(e.values()))["logprob"] for e in r.json()["choices"][0]["prompt_logprobs"] if e]


def distance(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def same(a: list[float], b: list[float]) -> bool:
    """Equal up to float rounding: a merged adapter (merge policy auto, one adapter's batch) or another batch
    shape moves a logprob by a few 1e-3 here; another adapter version moves them by tenths."""
    return distance(a, b) < 0.02


def version(responses: list[httpx.Response]) -> list[float]:
    """The one signature every response shares (asserted)."""
    first = signature(responses[0])
    assert all(same(signature(r), first) for r in responses[1:])
    return first


def test_an_adapter_uploaded_through_one_request_is_served_by_both_replicas(fleet, tenant):
    r = put(fleet, tenant, "pirate", seed=1)
    assert r.status_code == 201, r.text
    responses = burst(fleet, tenant, "pirate")
    assert answered_by(responses) == {x["replica"] for x in fleet.replicas()}  # both replicas served it
    base = signature(complete(fleet, tenant, "tiny-llama"))
    assert distance(version(responses), base) > 0.1  # the adapter ran, the same on both replicas


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(fleet, tenant):
    names = [f"affine-{i}" for i in range(4)]
    for i, name in enumerate(names):
        assert put(fleet, tenant, name, seed=10 + i).status_code == 201
    before = {x["replica"]: x["requests_by_adapter"] for x in fleet.replicas()}
    for name in names:  # the first request loads it on one replica, which tells Ray's router it holds it
        assert complete(fleet, tenant, name).status_code == 200
        time.sleep(0.5)  # Ray pushes a replica's model ids every 0.1 s; the router learns them soon after
    where: dict[str, Counter] = defaultdict(Counter)
    for _ in range(5):
        for name in names:
            r = complete(fleet, tenant, name)
            assert r.status_code == 200, r.text
            where[name][r.headers["x-svdserve-replica"]] += 1
    assert all(len(w) == 1 for w in where.values()), dict(where)  # each adapter: one replica, every time
    assert len({next(iter(w)) for w in where.values()}) == 2  # and the adapters are spread over both
    time.sleep(1.5)  # the replicas' own counters agree (they report every second)
    after = {x["replica"]: x["requests_by_adapter"] for x in fleet.replicas()}
    for name in names:
        counts = {rid: after[rid].get(f"acme/{name}", 0) - before.get(rid, {}).get(f"acme/{name}", 0)
                  for rid in after}
        assert sorted(counts.values()) == [0, 6], (name, counts)


def test_a_replace_and_a_delete_are_seen_by_every_replica(fleet, tenant):
    assert put(fleet, tenant, "evolving", seed=20).status_code == 201
    assert put(fleet, tenant, "second-version", seed=21).status_code == 201  # v2's bytes, to know its text
    old = burst(fleet, tenant, "evolving")
    assert len(answered_by(old)) == 2  # both replicas hold v1 (resident in their engines)
    v1, v2 = version(old), signature(complete(fleet, tenant, "second-version"))
    assert distance(v1, v2) > 0.1
    assert put(fleet, tenant, "evolving", seed=21).status_code == 200  # replaced through one replica
    new = burst(fleet, tenant, "evolving")
    assert len(answered_by(new)) == 2 and same(version(new), v2)  # no replica serves v1 any more
    with _client(fleet) as c:
        assert c.delete("/adapters/evolving", headers=tenant).status_code == 200
    gone = [complete(fleet, tenant, "evolving") for _ in range(16)]  # both hold it for Ray: both are asked
    assert {r.status_code for r in gone} == {404}
    assert len(answered_by(gone)) == 2


def test_streaming_passes_through_and_a_client_that_leaves_aborts_its_request(fleet, tenant):
    assert put(fleet, tenant, "streamer", seed=30).status_code == 201
    with _client(fleet) as c:
        with c.stream("POST", "/v1/chat/completions", headers=tenant, json={
                "model": "streamer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"

    with _client(fleet) as c:
        with c.stream("POST", "/v1/completions", headers=tenant, json={
                "model": "streamer", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            replica = r.headers["x-svdserve-replica"]
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break  # the client hangs up with ~200 tokens to go
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine = next(x["engine"] for x in fleet.replicas() if x["replica"] == replica)
        if engine["aborted_total"] >= 1 and engine["running"] == 0:
            break
        time.sleep(0.5)
    assert engine["aborted_total"] >= 1 and engine["running"] == 0, engine


def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(fleet, tenant):
    assert put(fleet, tenant, "survivor", seed=40).status_code == 201
    victim = fleet.replicas()[0]
    os.kill(victim["pid"], signal.SIGKILL)
    statuses, deadline, replaced = Counter(), time.monotonic() + 240, None
    while time.monotonic() < deadline:
        r = complete(fleet, tenant, "survivor", max_tokens=4)
        statuses[r.status_code] += 1
        ids = {x["replica"] for x in fleet.replicas()}
        if len(ids) == 2 and victim["replica"] not in ids:
            replaced = ids
            break
        time.sleep(0.3)
    assert replaced, f"no replacement replica after 240 s:\n{fleet.log_tail()}"
    assert set(statuses) == {200}, statuses  # not one request failed meanwhile
    new = (replaced - {victim["replica"]}).pop()
    served = answered_by(burst(fleet, tenant, "survivor"))
    assert new in served  # the replacement serves too
