"""Tenants over HTTP, in-process on a tiny random model, against SQLite and PostgreSQL: keys and roles, the
admin API, private adapters (another tenant's is a 404 for every operation), public adapters, quotas and rate
limits, usage metering, the audit log, open mode, restart and the adoption of an earlier store."""

from __future__ import annotations

import os
import threading

import pytest

from server.tenancy.database import Database
from tests.tenancy.conftest import ADMIN_KEY, tiny_server

PROMPT = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


def _err(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


def _complete(tiny, headers, **body):
    r = tiny.client.post("/v1/completions", json={**PROMPT, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/adapters"), ("GET", "/adapters/x"),
                                         ("PUT", "/adapters/x"), ("DELETE", "/adapters/x"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/usage"), ("GET", "/admin/tenants")])
def test_missing_or_unknown_key_is_401(tiny, method, path):
    for headers in ({}, {"Authorization": "Bearer sk-svd-not-a-key"}, {"Authorization": "Basic abc"}):
        r = tiny.client.request(method, path, headers=headers, json={"prompt": "x"} if method == "POST" else None)
        _err(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert tiny.client.get("/health").status_code == 200  # liveness needs no key


def test_tenant_key_on_admin_routes_is_403(tiny):
    acme = tiny.tenant("acme")
    for method, path in [("GET", "/admin/tenants"), ("POST", "/admin/tenants"), ("GET", "/admin/audit"),
                         ("DELETE", "/admin/keys/key_x"), ("PATCH", "/adapters/x")]:
        r = tiny.client.request(method, path, headers=acme, json={"name": "evil"} if method == "POST" else None)
        _err(r, 403, "insufficient_permissions")


def test_admin_api_tenants_and_keys(tiny):
    c, admin = tiny.client, tiny.as_admin()
    r = c.post("/admin/tenants", json={"name": "acme", "quota": {"requests_per_minute": 10}}, headers=admin)
    assert r.status_code == 201 and r.json()["name"] == "acme" and r.json()["quota"] == {"requests_per_minute": 10}
    _err(c.post("/admin/tenants", json={"name": "acme"}, headers=admin), 409)
    for bad in ({"name": "a b"}, {"name": ".hidden"}, {"name": "x" * 65}, {"name": 5},
                {"name": "q", "quota": {"bogus": 1}}, {"name": "q", "quota": {"requests_per_minute": -1}},
                {"name": "q", "weight": 0}, {"name": "q", "extra": 1}):
        _err(c.post("/admin/tenants", json=bad, headers=admin), 400)
    assert [t["name"] for t in c.get("/admin/tenants", headers=admin).json()["data"]] == ["acme", "default"]
    r = c.patch("/admin/tenants/acme", json={"quota": {"tokens_per_minute": 500}, "weight": 3}, headers=admin)
    assert r.json()["quota"] == {"requests_per_minute": 10, "tokens_per_minute": 500} and r.json()["weight"] == 3
    _err(c.get("/admin/tenants/nope", headers=admin), 404)

    made = c.post("/admin/tenants/acme/keys", json={"description": "ci"}, headers=admin).json()
    assert made["key"].startswith("sk-svd-") and len(made["key"]) > 40 and made["key"].startswith(made["prefix"])
    listed = c.get("/admin/tenants/acme/keys", headers=admin).json()["data"]
    assert [k["id"] for k in listed] == [made["id"]] and all("key" not in k for k in listed)
    key = {"Authorization": f"Bearer {made['key']}"}
    assert c.get("/v1/models", headers=key).status_code == 200

    r = c.delete(f"/admin/keys/{made['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    _err(c.get("/v1/models", headers=key), 401, "invalid_api_key")  # revocation: the very next request
    _err(c.delete("/admin/keys/key_nope", headers=admin), 404)


def test_keys_are_stored_only_hashed(tiny, db_url):
    made = tiny.client.post("/admin/tenants", json={"name": "acme"}, headers=tiny.as_admin())
    key = tiny.client.post("/admin/tenants/acme/keys", json={}, headers=tiny.as_admin()).json()["key"]
    db = Database(db_url)
    try:
        with db.engine.connect() as conn:
            from sqlalchemy import text

            rows = [tuple(map(str, r)) for r in conn.execute(text("SELECT * FROM api_keys"))]
    finally:
        db.dispose()
    assert made.status_code == 201 and rows and not any(key in v or key[7:] in v for r in rows for v in r)


def test_expired_key_is_401(tiny):
    tiny.client.post("/admin/tenants", json={"name": "acme"}, headers=tiny.as_admin())
    made = tiny.client.post("/admin/tenants/acme/keys", json={"expires_at": "2020-01-01T00:00:00Z"},
                            headers=tiny.as_admin()).json()
    _err(tiny.client.get("/v1/models", headers={"Authorization": f"Bearer {made['key']}"}), 401)


def test_another_tenants_adapter_is_a_404_for_everything(tiny):
    c, a, b = tiny.client, tiny.tenant("alpha"), tiny.tenant("beta")
    assert c.put("/adapters/bot", content=tiny.adapter_bytes(1), headers=a).status_code == 201
    before = c.get("/adapters/bot", headers=a).json()
    missing = _err(c.get("/adapters/alpha/nope", headers=b), 404)  # what "does not exist" looks like
    assert missing["message"] == "adapter 'alpha/nope' not found"
    attempts = [("GET", "/adapters/bot", None), ("GET", "/adapters/alpha/bot", None),
                ("PUT", "/adapters/alpha/bot", tiny.adapter_bytes(2)), ("DELETE", "/adapters/alpha/bot", None),
                ("DELETE", "/adapters/bot", None)]
    for method, path, body in attempts:
        err = _err(c.request(method, path, content=body, headers=b), 404, "adapter_not_found")
        assert err["message"] == f"adapter {path[len('/adapters/'):]!r} not found"
    for field in ("adapter_id", "model"):
        for name in ("bot", "alpha/bot"):
            _err(c.post("/v1/completions", json={**PROMPT, field: name}, headers=b), 404, "model_not_found")
            _err(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], field: name},
                        headers=b), 404, "model_not_found")
    assert [m["id"] for m in c.get("/v1/models", headers=b).json()["data"]][1:] == []
    assert c.get("/adapters", headers=b).json()["data"] == []
    assert c.get("/adapters/bot", headers=a).json() == before  # nothing changed for its owner
    assert c.get("/adapters", headers=tiny.as_admin()).json()["data"][0]["id"] == "alpha/bot"


def test_same_id_in_two_tenants_each_gets_its_own(tiny):
    c, a, b = tiny.client, tiny.tenant("alpha"), tiny.tenant("beta")
    c.put("/adapters/bot", content=tiny.adapter_bytes(1), headers=a)
    c.put("/adapters/bot", content=tiny.adapter_bytes(2, method="loraxs"), headers=b)
    assert c.get("/adapters/bot", headers=a).json()["method"] == "osora"
    assert c.get("/adapters/bot", headers=b).json()["method"] == "loraxs"
    alone = {k: _complete(tiny, h, adapter_id="bot")["choices"][0]["token_ids"] for k, h in (("a", a), ("b", b))}
    assert alone["a"] != alone["b"]
    got: dict[int, list[int]] = {}

    def send(i: int) -> None:
        got[i] = _complete(tiny, a if i % 2 else b, model="bot")["choices"][0]["token_ids"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] == alone["a" if i % 2 else "b"] for i in range(8))


def test_public_adapter_is_readable_and_usable_not_writable(tiny):
    c, a, b = tiny.client, tiny.tenant("alpha"), tiny.tenant("beta")
    c.put("/adapters/bot", content=tiny.adapter_bytes(1), headers=a)
    _err(c.patch("/adapters/bot", json={"visibility": "public"}, headers=a), 403)
    r = c.patch("/adapters/alpha/bot", json={"visibility": "public"}, headers=tiny.as_admin())
    assert r.status_code == 200 and r.json()["visibility"] == "public"
    assert c.get("/adapters/alpha/bot", headers=b).json()["owner"] == "alpha"
    assert "alpha/bot" in [m["id"] for m in c.get("/v1/models", headers=b).json()["data"]]
    used = _complete(tiny, b, model="alpha/bot")
    assert used["model"] == "alpha/bot"
    assert used["choices"][0]["token_ids"] == _complete(tiny, a, model="bot")["choices"][0]["token_ids"]
    _err(c.put("/adapters/alpha/bot", content=tiny.adapter_bytes(3), headers=b), 404)
    _err(c.delete("/adapters/alpha/bot", headers=b), 404)
    c.patch("/adapters/alpha/bot", json={"visibility": "private"}, headers=tiny.as_admin())
    _err(c.get("/adapters/alpha/bot", headers=b), 404)


def test_storage_quota_is_403_and_leaves_the_store_unchanged(tiny):
    c = tiny.client
    small = tiny.adapter_bytes(1)
    a = tiny.tenant("alpha", quota={"max_adapters": 1, "max_storage_bytes": len(small) + 100})
    assert c.put("/adapters/one", content=small, headers=a).status_code == 201
    files = sorted(os.listdir(os.path.join(tiny.store, "alpha")))
    err = _err(c.put("/adapters/two", content=small, headers=a), 403, "quota_exceeded")
    assert "max_adapters" in err["message"] and err["param"] == "max_adapters"
    big = tiny.adapter_bytes(2, rank=8)
    err = _err(c.put("/adapters/one", content=big, headers=a), 403, "quota_exceeded")
    assert err["param"] == "max_storage_bytes"
    assert sorted(os.listdir(os.path.join(tiny.store, "alpha"))) == files
    assert c.put("/adapters/one", content=tiny.adapter_bytes(3), headers=a).status_code == 200  # replace fits


def test_request_rate_limit_is_429_with_openai_headers(tiny):
    a = tiny.tenant("alpha", quota={"requests_per_minute": 2, "tokens_per_minute": 600})
    r = tiny.client.post("/v1/completions", json=PROMPT, headers=a)
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
    assert r.headers["x-ratelimit-limit-tokens"] == "600"
    refilled = int(r.headers["x-ratelimit-remaining-tokens"]) - (600 - r.json()["usage"]["total_tokens"])
    assert 0 <= refilled <= 20  # the bucket refills at 10 tokens a second while the request runs
    assert tiny.client.get("/v1/models", headers=a).headers["x-ratelimit-remaining-requests"] == "1"
    assert tiny.client.post("/v1/completions", json=PROMPT, headers=a).status_code == 200
    r = tiny.client.post("/v1/completions", json=PROMPT, headers=a)
    _err(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    other = tiny.tenant("beta", quota={"requests_per_minute": 2})
    assert tiny.client.post("/v1/completions", json=PROMPT, headers=other).status_code == 200  # not shared


def test_token_rate_limit(tiny):
    a = tiny.tenant("alpha", quota={"tokens_per_minute": 30})
    _err(tiny.client.post("/v1/completions", json={**PROMPT, "max_tokens": 40}, headers=a), 400, "request_too_large")
    assert tiny.client.post("/v1/completions", json={**PROMPT, "max_tokens": 20}, headers=a).status_code == 200
    r = tiny.client.post("/v1/completions", json={**PROMPT, "max_tokens": 20}, headers=a)
    _err(r, 429, "rate_limit_exceeded")
    assert "tokens_per_minute" in r.json()["error"]["message"]


def test_usage_totals_equal_the_responses(tiny):
    c, a, b = tiny.client, tiny.tenant("alpha"), tiny.tenant("beta")
    c.put("/adapters/bot", content=tiny.adapter_bytes(1), headers=a)
    usages = [_complete(tiny, a)["usage"], _complete(tiny, a, adapter_id="bot", n=2)["usage"],
              _complete(tiny, a, prompt=["one", "two"], n=2)["usage"]]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
               headers=a)
    usages.append(r.json()["usage"])
    with c.stream("POST", "/v1/completions", json={**PROMPT, "stream": True,
                                                   "stream_options": {"include_usage": True}}, headers=a) as s:
        import json

        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    usages.append(events[-1]["usage"])
    _complete(tiny, b)
    mine = c.get("/v1/usage", headers=a).json()
    assert mine["totals"]["requests"] == len(usages)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert mine["totals"][k] == sum(u[k] for u in usages), k
    assert {row["tenant"] for row in mine["data"]} == {"alpha"}
    assert {row["adapter"] for row in mine["data"]} == {None, "alpha/bot"}
    assert c.get("/v1/usage?tenant=beta", headers=a).json() == mine  # a tenant sees only its own
    everyone = c.get("/v1/usage", headers=tiny.as_admin()).json()
    assert everyone["totals"]["requests"] == len(usages) + 1
    assert c.get("/v1/usage?start=2999-01-01", headers=a).json()["totals"]["requests"] == 0
    _err(c.get("/v1/usage?start=yesterday", headers=a), 400)


def test_audit_log_records_who_did_what(tiny):
    c, a = tiny.client, tiny.tenant("alpha")
    v1, v2 = tiny.adapter_bytes(1), tiny.adapter_bytes(2)
    c.put("/adapters/bot", content=v1, headers=a)
    c.put("/adapters/bot", content=v2, headers=a)
    c.delete("/adapters/bot", headers=a)
    events = c.get("/admin/audit", headers=tiny.as_admin()).json()["data"]
    actions = [(e["actor"], e["action"], e["target"]) for e in reversed(events)]
    assert actions[:2] == [("admin", "tenant.create", "alpha"), ("admin", "key.create", actions[1][2])]
    assert actions[2:] == [("alpha", "adapter.put", "alpha/bot"), ("alpha", "adapter.replace", "alpha/bot"),
                           ("alpha", "adapter.delete", "alpha/bot")]
    import hashlib

    assert [e["detail"]["sha256"] for e in reversed(events[:3])] == [
        hashlib.sha256(v).hexdigest() for v in (v1, v2, v2)]
    assert all(e["key_id"] for e in events)


def test_deleting_a_tenant_removes_its_keys_and_adapters(tiny):
    c, a = tiny.client, tiny.tenant("alpha")
    c.put("/adapters/bot", content=tiny.adapter_bytes(1), headers=a)
    _complete(tiny, a)
    assert c.delete("/admin/tenants/alpha", headers=tiny.as_admin()).status_code == 200
    _err(c.get("/v1/models", headers=a), 401)
    assert not os.listdir(os.path.join(tiny.store, "alpha"))
    assert c.get("/v1/usage", headers=tiny.as_admin()).json()["totals"]["requests"] == 1  # billing stays
    _err(c.delete("/admin/tenants/default", headers=tiny.as_admin()), 400)


def test_open_mode_until_the_first_key(tmp_path, db_url):
    client, _, _ = tiny_server(str(tmp_path / "store"), db_url)
    with client as c:
        assert c.get("/v1/models").status_code == 200  # no key configured: loopback clients are the admin
        assert c.get("/v1/models", headers={"Authorization": "Bearer EMPTY"}).status_code == 200
        assert c.post("/admin/tenants", json={"name": "acme"}).status_code == 201
        key = c.post("/admin/tenants/acme/keys", json={}).json()["key"]
        _err(c.get("/v1/models"), 401)  # a key exists now: everyone needs one
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        _err(c.get("/admin/tenants", headers={"Authorization": f"Bearer {key}"}), 403)


def test_everything_survives_a_restart_and_an_old_store_is_adopted(tmp_path, db_url):
    store = tmp_path / "store"
    client, base, factors = tiny_server(str(store), db_url, admin_key=ADMIN_KEY)
    from adapters.file import BaseSpec
    from adapters.synthetic import random_adapter

    spec = BaseSpec(shapes=base.shapes(), r_max=16, fingerprint=base.fingerprint)
    store.mkdir()
    (store / "legacy.safetensors").write_bytes(random_adapter("osora", spec, factors, rank=4, seed=9).to_bytes())
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with client as c:
        assert c.get("/adapters/legacy", headers=admin).status_code == 200  # the admin's plain ids: default's
        c.post("/admin/tenants", json={"name": "acme", "quota": {"max_adapters": 5}}, headers=admin)
        key = {"Authorization": "Bearer " + c.post("/admin/tenants/acme/keys", json={}, headers=admin).json()["key"]}
        c.put("/adapters/bot", content=random_adapter("osora", spec, factors, rank=4, seed=1).to_bytes(), headers=key)
        before = c.post("/v1/completions", json={**PROMPT, "model": "bot"}, headers=key).json()
    client, _, _ = tiny_server(str(store), db_url, admin_key=ADMIN_KEY)
    with client as c:
        after = c.post("/v1/completions", json={**PROMPT, "model": "bot"}, headers=key).json()
        assert after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
        assert c.get("/admin/tenants/acme", headers=admin).json()["quota"] == {"max_adapters": 5}
        assert c.get("/v1/usage", headers=key).json()["totals"]["requests"] == 2  # one before, one after
        assert [a["id"] for a in c.get("/adapters", headers=admin).json()["data"]] == ["acme/bot", "legacy"]
