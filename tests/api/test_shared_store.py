"""Two real server processes (a tiny model) sharing one PostgreSQL database and one S3 bucket (moto's server):
an adapter uploaded through either is served by both; after a replace or a delete through one, the other never
serves the old version to a new request — each request resolves the current version from the shared index."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from adapters.factors import compute_factors
from adapters.synthetic import random_adapter
from tests.conftest import ServerProcess, start_server, stop_server, tiny_chat_model

R_MAX = 16
PROMPT = "hello there"


@pytest.fixture(scope="module")
def adapters_v() -> list[bytes]:
    """Three strong random OSoRA adapters for the tiny model (their greedy tokens differ from each other's)."""
    base = tiny_chat_model()
    from adapters.file import BaseSpec

    factors = compute_factors(base.targets, R_MAX, progress=False)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    return [random_adapter("osora", spec, factors, rank=8, seed=s, strength=3.0).to_bytes() for s in range(3)]


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, postgres, s3_server, tmp_path_factory) -> Iterator[list[ServerProcess]]:
    import os

    bucket, database = s3_server.new_bucket(), postgres.new_database()
    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)  # the servers inherit the AWS_* variables that point at the test S3 server
    servers: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            tmp = tmp_path_factory.mktemp(f"replica-{name}")
            servers.append(start_server(tmp, "--model", tiny_model_dir, "--max-rank", str(R_MAX),
                                        "--max-model-len", "128", "--cache-dir", str(tmp / "factors"),
                                        "--store", f"s3://{bucket}/fleet", "--store-cache-dir", str(tmp / "cache"),
                                        "--database-url", database))
        yield servers
    finally:
        for srv in servers:
            stop_server(srv)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tokens(srv: ServerProcess, model: str) -> list[int] | int:
    """Greedy token ids of a short completion on `model`, or the HTTP status when it is not a 200."""
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    if r.status_code != 200:
        return r.status_code
    return r.json()["choices"][0]["token_ids"]


def test_uploads_replaces_and_deletes_through_one_replica_are_seen_by_the_other(replicas, adapters_v):
    a, b = replicas
    v0, v1, v2 = adapters_v
    for srv, name, data in ((a, "ref0", v0), (b, "ref1", v1), (a, "ref2", v2)):
        assert httpx.put(f"{srv.url}/adapters/{name}", content=data, timeout=60).status_code == 201
    expected = {i: tokens(a, f"ref{i}") for i in range(3)}
    assert len({tuple(t) for t in expected.values()}) == 3, expected  # the versions are told apart by their tokens
    assert all(tokens(b, f"ref{i}") == expected[i] for i in range(3))  # uploaded through either, served by both

    assert httpx.put(f"{a.url}/adapters/x", content=v0, timeout=60).status_code == 201
    assert tokens(a, "x") == tokens(b, "x") == expected[0]  # both now hold version 0 (parsed and resident)
    r = httpx.put(f"{b.url}/adapters/x", content=v1, timeout=60)  # replace through b
    assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(v1).hexdigest()
    assert httpx.get(f"{a.url}/adapters/x").json()["sha256"] == hashlib.sha256(v1).hexdigest()
    assert tokens(a, "x") == expected[1] and tokens(b, "x") == expected[1]  # a never serves version 0 again
    r = httpx.put(f"{a.url}/adapters/x", content=v2, timeout=60)  # and back through a
    assert r.status_code == 200 and tokens(b, "x") == expected[2] and tokens(a, "x") == expected[2]

    assert httpx.delete(f"{b.url}/adapters/x").status_code == 200  # delete through b
    assert tokens(a, "x") == 404 and tokens(b, "x") == 404
    assert httpx.get(f"{a.url}/adapters/x").status_code == 404
    listed = {m["id"] for m in httpx.get(f"{a.url}/v1/models").json()["data"]}
    assert "x" not in listed and {"ref0", "ref1", "ref2"} <= listed
