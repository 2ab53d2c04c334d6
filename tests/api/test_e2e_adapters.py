"""End to end on the default model: the adapter store over HTTP — refusals leave it unchanged, replacement
never disturbs a running stream, cancelled streams free their slot."""

from __future__ import annotations

import json
import math
import os
import time

import httpx
import pytest
import torch
from safetensors.torch import save

from adapters.file import Adapter
from tests.api.conftest import PROMPT, complete, sse_events, upload
from tests.conftest import TEST_MAX_ADAPTER_BYTES

pytestmark = pytest.mark.e2e


def _snapshot(client, server) -> tuple:
    listed = client.get("/adapters").json()["data"]
    files = sorted(os.listdir(server.store))
    return [(a["id"], a["sha256"]) for a in listed], files


def _bad_uploads(reference) -> list[tuple[str, str, bytes, int, str]]:
    """(case, adapter id, body, expected status, words the error message must contain)"""
    good = reference.adapter("osora", seed=1, rank=4)
    name = next(iter(good.layers))
    wrong_shape = Adapter("osora", 4, {name: {"osora_S": torch.ones(5), "osora_O": torch.ones(
        reference.spec.shapes[name][0])}}, base_fingerprint=reference.spec.fingerprint)
    nan = reference.adapter("osora", seed=2, rank=4)
    nan.layers[name]["osora_S"][0] = math.nan
    other_base = reference.adapter("osora", seed=3, rank=4)
    other_base.base_fingerprint = "0123456789abcdef"
    too_big_rank = Adapter("loraxs", 65, {name: {"loraxs_R": torch.zeros(65, 65)}},
                           base_fingerprint=reference.spec.fingerprint)
    bad_meta = save({"x": torch.zeros(2)}, metadata={"format": "something-else"})
    return [
        ("id '..' (the client resolves it: no route)", "..", good.to_bytes(), 404, "not found"),
        ("id '..' percent-encoded", "%2E%2E", good.to_bytes(), 400, "invalid adapter id"),
        ("id that is a path", "a%2Fb", good.to_bytes(), 404, "not found"),
        ("id too long", "a" * 65, good.to_bytes(), 400, "invalid adapter id"),
        ("id with a space", "a%20b", good.to_bytes(), 400, "invalid adapter id"),
        ("not safetensors", "bad-1", b"this is not a safetensors file", 400, "not a safetensors file"),
        ("empty body", "bad-2", b"", 400, "empty body"),
        ("foreign safetensors", "bad-3", bad_meta, 400, "format"),
        ("wrong shape", "bad-4", wrong_shape.to_bytes(), 400, "shape"),
        ("NaN", "bad-5", nan.to_bytes(), 400, "NaN"),
        ("fingerprint mismatch", "bad-6", other_base.to_bytes(), 400, "base_fingerprint"),
        ("rank > r_max", "bad-7", too_big_rank.to_bytes(), 400, "r_max"),
        ("body too large", "bad-8", b"\0" * (TEST_MAX_ADAPTER_BYTES + 1), 413, "exceeds the limit"),
        ("bad bytes over an existing adapter", "keep", b"garbage" * 10, 400, "not a safetensors file"),
    ]


def test_every_bad_upload_is_4xx_and_leaves_the_store_unchanged(client, server, reference):
    assert upload(client, "keep", reference.adapter("loraxs", seed=9, rank=4)).status_code in (200, 201)
    before = _snapshot(client, server)
    for case, adapter_id, body, status, words in _bad_uploads(reference):
        r = client.put(f"/adapters/{adapter_id}", content=body)
        assert r.status_code == status, (case, r.text)
        err = r.json()["error"]
        assert words.lower() in err["message"].lower(), (case, err)
        assert set(err) == {"message", "type", "param", "code"}
        assert _snapshot(client, server) == before, case
    assert client.get("/adapters/keep").json()["sha256"] == dict(before[0])["keep"]


def test_put_get_list_delete(client, reference):
    a1, a2 = reference.adapter("vera", seed=1, rank=4), reference.adapter("vera", seed=2, rank=4)
    client.delete("/adapters/crud")
    r = upload(client, "crud", a1)
    assert r.status_code == 201
    info = r.json()
    assert info["id"] == "crud" and info["method"] == "vera" and info["bytes"] == len(a1.to_bytes())
    assert upload(client, "crud", a2).status_code == 200  # replaced
    assert client.get("/adapters/crud").json()["sha256"] != info["sha256"]
    assert "crud" in [a["id"] for a in client.get("/adapters").json()["data"]]
    assert "crud" in [m["id"] for m in client.get("/v1/models").json()["data"][1:]]
    assert complete(client, PROMPT, 2, adapter_id="crud")["model"] == "crud"
    assert client.delete("/adapters/crud").json() == {"id": "crud", "object": "adapter", "deleted": True}
    assert client.get("/adapters/crud").status_code == 404
    assert client.delete("/adapters/crud").status_code == 404
    r = client.post("/v1/completions", json={"prompt": PROMPT, "adapter_id": "crud"})
    assert r.status_code == 404


def _stats(client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name.removeprefix("svdserve_")] = float(value)
    return out


def test_replacing_an_adapter_mid_stream_keeps_the_old_version(client, reference):
    old, new = reference.adapter("osora", seed=21), reference.adapter("osora", seed=22)
    assert upload(client, "swap", old).status_code in (200, 201)
    n = 48
    expected_old = complete(client, PROMPT, n, adapter_id="swap")["choices"][0]["token_ids"]
    req = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
           "return_token_ids": True, "adapter_id": "swap"}
    with client.stream("POST", "/v1/completions", json=req) as s:
        lines = s.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert upload(client, "swap", new).status_code == 200
        assert _stats(client)["running"] >= 1, "the stream should still be running after the replacement"
        events = [json.loads(first[6:])] + sse_events(lines)
    assert events[-1] == "[DONE]"
    tokens = [t for e in events[:-1] for c in e["choices"] for t in c.get("token_ids", [])]
    assert tokens == expected_old
    after = complete(client, PROMPT, n, adapter_id="swap")["choices"][0]["token_ids"]
    assert after == reference.greedy(reference.encode(PROMPT), n, new) and after != expected_old


def test_cancelled_stream_frees_its_slot(client):
    req = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    aborted = _stats(client)["aborted_total"]
    with client.stream("POST", "/v1/completions", json=req) as s:
        lines = s.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert _stats(client)["running"] == 1
    # leaving the block closes the connection: the server must abort the request, not finish 1500 tokens
    deadline = time.monotonic() + 10
    while _stats(client)["running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = _stats(client)
    assert stats["running"] == 0 and stats["aborted_total"] == aborted + 1


def test_abandoned_plain_request_is_aborted(client, server):
    aborted = _stats(client)["aborted_total"]
    req = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1500 tokens
        httpx.post(server.url + "/v1/completions", json=req, timeout=3)
    deadline = time.monotonic() + 10
    while _stats(client)["running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = _stats(client)
    assert stats["running"] == 0 and stats["aborted_total"] == aborted + 1
