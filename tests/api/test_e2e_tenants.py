"""End to end on the default model, over real HTTP, against SQLite (the default, in the store) and against
the suite's own PostgreSQL server: two tenants with the same adapter id get their own tokens in one mixed
batch; every cross-tenant attempt is a 404 that changes nothing; revoked and unknown keys are 401; the openai
client works with a tenant key; quotas answer 403/429 with OpenAI's headers; usage totals equal the responses';
and everything survives a restart. Open mode is refused on a non-loopback address."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import PROMPT, Reference
from tests.conftest import FACTOR_CACHE, REPO, ServerProcess, _clean_env, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e
ADMIN = "sk-svd-e2e-admin-key-0123456789abcdef"
N_TOKENS = 8


@dataclass
class Fleet:
    """One server with an admin key, its database, and two tenants with a key each."""

    server: ServerProcess
    tmp: Path
    db_args: tuple[str, ...]
    keys: dict[str, str]

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN if who == 'admin' else self.keys[who]}"}

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=300, headers=self.headers(who))


def _start(tmp: Path, db_args: tuple[str, ...]) -> ServerProcess:
    return start_server(tmp, "--admin-key", ADMIN, "--max-batch-size", "32", *db_args)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory, reference) -> Fleet:
    tmp = tmp_path_factory.mktemp(f"tenants-{request.param}")
    db_args = () if request.param == "sqlite" else ("--database-url", request.getfixturevalue("postgres").new_database())
    srv = _start(tmp, db_args)
    keys = {}
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
        for name, quota in (("alpha", {}), ("beta", {}), ("gamma", {"requests_per_minute": 2, "max_adapters": 1,
                                                                     "max_concurrent_requests": 1})):
            assert admin.post("/admin/tenants", json={"name": name, "quota": quota}).status_code == 201
            keys[name] = admin.post(f"/admin/tenants/{name}/keys", json={}).json()["key"]
    f = Fleet(srv, tmp, db_args, keys)
    yield f
    stop_server(f.server)


def _complete(c: httpx.Client, model: str, **body) -> dict:
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0,
                                        "ignore_eos": True, "return_token_ids": True, "model": model, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_same_adapter_id_two_tenants_one_mixed_batch(fleet, reference: Reference):
    adapters = {"alpha": reference.adapter("osora", seed=501, rank=8), "beta": reference.adapter("loraxs", seed=502)}
    for who, adapter in adapters.items():
        with fleet.client(who) as c:
            assert c.put("/adapters/support-bot", content=adapter.to_bytes()).status_code == 201
    alone = {}
    for who in adapters:
        with fleet.client(who) as c:
            alone[who] = _complete(c, "support-bot")["choices"][0]["token_ids"]
    ids = reference.encode(PROMPT)
    assert alone["alpha"] == reference.greedy(ids, N_TOKENS, adapters["alpha"])
    assert alone["beta"] == reference.greedy(ids, N_TOKENS, adapters["beta"])
    assert alone["alpha"] != alone["beta"]

    async def together() -> list[tuple[str, list[int]]]:
        async with httpx.AsyncClient(base_url=fleet.server.url, timeout=300) as ac:
            async def one(i: int) -> tuple[str, list[int]]:
                who = "alpha" if i % 2 else "beta"
                r = await ac.post("/v1/completions", headers=fleet.headers(who), json={
                    "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "adapter_id": "support-bot"})
                assert r.status_code == 200, r.text
                return who, r.json()["choices"][0]["token_ids"]
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert all(tokens == alone[who] for who, tokens in asyncio.run(together()))


def test_cross_tenant_attempts_are_404_and_change_nothing(fleet, reference):
    with fleet.client("alpha") as a, fleet.client("beta") as b:
        if a.get("/adapters/support-bot").status_code == 404:
            a.put("/adapters/support-bot", content=reference.adapter("osora", seed=501, rank=8).to_bytes())
        before = a.get("/adapters/support-bot").json()
        other = reference.adapter("vera", seed=503).to_bytes()
        for method, path, body in [("GET", "/adapters/alpha/support-bot", None),
                                   ("PUT", "/adapters/alpha/support-bot", other),
                                   ("DELETE", "/adapters/alpha/support-bot", None)]:
            r = b.request(method, path, content=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text
        for field in ("model", "adapter_id"):
            r = b.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, field: "alpha/support-bot"})
            assert r.status_code == 404, r.text
        assert "alpha/support-bot" not in [m["id"] for m in b.get("/v1/models").json()["data"]]
        assert all(x["owner"] == "beta" for x in b.get("/adapters").json()["data"])
        assert a.get("/adapters/support-bot").json() == before


def test_unknown_and_revoked_keys_are_401(fleet):
    with httpx.Client(base_url=fleet.server.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer sk-svd-nope"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        made = c.post("/admin/tenants/beta/keys", json={"description": "temp"}, headers=fleet.headers("admin")).json()
        temp = {"Authorization": f"Bearer {made['key']}"}
        assert c.get("/v1/models", headers=temp).status_code == 200
        assert c.delete(f"/admin/keys/{made['id']}", headers=fleet.headers("admin")).status_code == 200
        assert c.get("/v1/models", headers=temp).status_code == 401


def test_openai_client_with_a_tenant_key(fleet, reference):
    with fleet.client("alpha") as a:
        if a.get("/adapters/support-bot").status_code == 404:
            a.put("/adapters/support-bot", content=reference.adapter("osora", seed=501, rank=8).to_bytes())
        raw = _complete(a, "support-bot")["choices"][0]["text"]
    oai = openai.OpenAI(base_url=fleet.server.url + "/v1", api_key=fleet.keys["alpha"], max_retries=0)
    c = oai.completions.create(model="support-bot", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0,
                               extra_body={"ignore_eos": True})
    assert c.choices[0].text == raw and c.model == "support-bot"
    assert "support-bot" in [m.id for m in oai.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fleet.server.url + "/v1", api_key="sk-svd-wrong", max_retries=0).models.list()


def test_quotas_and_rate_limits(fleet, reference):
    with fleet.client("gamma") as g:
        assert g.put("/adapters/one", content=reference.adapter("osora", seed=7, rank=4).to_bytes()).status_code == 201
        r = g.put("/adapters/two", content=reference.adapter("osora", seed=8, rank=4).to_bytes())
        assert r.status_code == 403 and r.json()["error"]["code"] == "quota_exceeded", r.text
        assert [x["id"] for x in g.get("/adapters").json()["data"]] == ["one"]
        body = {"prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, "stream": True}
        with g.stream("POST", "/v1/completions", json=body) as s:  # holds the one concurrent place
            assert s.status_code == 200, s.read()
            lines = s.iter_lines()  # kept: a dropped iterator closes the stream, which frees the place
            assert next(lines).startswith("data: {")
            r = g.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 429 and "max_concurrent_requests" in r.json()["error"]["message"], r.text
            assert list(lines)[-2] == "data: [DONE]"
        assert g.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200  # 2nd of 2
        r = g.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 429 and "requests_per_minute" in r.json()["error"]["message"], r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"


def test_usage_equals_the_responses_and_everything_survives_a_restart(fleet, reference):
    with fleet.client("beta") as b:
        start = b.get("/v1/usage").json()["totals"]
        usages = [_complete(b, reference.base.name)["usage"], _complete(b, reference.base.name, n=2)["usage"]]
        r = b.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        usages.append(r.json()["usage"])
        got = b.get("/v1/usage").json()["totals"]
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert got[k] - start[k] == sum(u[k] for u in usages), k
        assert got["requests"] - start["requests"] == len(usages)
        if b.get("/adapters/support-bot").status_code == 404:
            b.put("/adapters/support-bot", content=reference.adapter("loraxs", seed=502).to_bytes())
        tokens = _complete(b, "support-bot")["choices"][0]["token_ids"]
        totals = b.get("/v1/usage").json()["totals"]
    stop_server(fleet.server)
    fleet.server = _start(fleet.tmp, fleet.db_args)
    with fleet.client("beta") as b:
        assert _complete(b, "support-bot")["choices"][0]["token_ids"] == tokens
        after = b.get("/v1/usage").json()["totals"]
        assert after["requests"] == totals["requests"] + 1
    with fleet.client("admin") as admin:
        assert {t["name"] for t in admin.get("/admin/tenants").json()["data"]} >= {"alpha", "beta", "gamma"}
        assert any(e["action"] == "adapter.put" for e in admin.get("/admin/audit").json()["data"])


def test_open_mode_is_refused_beyond_loopback(tmp_path):
    cmd = [sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", str(free_port()),
           "--store", str(tmp_path / "store"), "--cache-dir", str(FACTOR_CACHE)]
    r = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--insecure-open" in r.stderr and "SVDSERVE_ADMIN_KEY" in r.stderr, r.stderr
