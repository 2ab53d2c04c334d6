"""Prefix caching over HTTP: `usage.prompt_tokens_details.cached_tokens` on completions and chat (plain and
streamed), the same tokens as uncached, and `cache_salt` isolating a request's blocks."""

from __future__ import annotations

import json

import pytest

from tests.tenancy.conftest import tiny_server

SYSTEM = "you are a terse assistant who answers every question in exactly one short line of text. " * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite", max_model_len=256)
    with c:
        yield c


def complete(client, prompt: str, **extra) -> dict:
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_report_cached_tokens_with_the_uncached_tokens(tiny):
    first = complete(tiny, SYSTEM + "what is 2+2?")
    again = complete(tiny, SYSTEM + "what is 2+2?")
    other = complete(tiny, SYSTEM + "name a colour")
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(SYSTEM) // 16 * 16 - 16
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]


def test_cache_salt_isolates_and_streams_report_it(tiny):
    prompt = SYSTEM + "salted question"
    complete(tiny, prompt)
    salted = complete(tiny, prompt, cache_salt="tenant-secret")
    resalted = complete(tiny, prompt, cache_salt="tenant-secret")
    assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert resalted["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert salted["choices"][0]["token_ids"] == resalted["choices"][0]["token_ids"]
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with tiny.stream("POST", "/v1/completions", json=body) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    r = tiny.post("/v1/completions", json={"prompt": "x", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_chat_reports_cached_tokens(tiny):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]
    outs = [tiny.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0})
            for _ in range(2)]
    assert all(r.status_code == 200 for r in outs), outs[0].text
    u0, u1 = (r.json()["usage"] for r in outs)
    assert u0["prompt_tokens_details"]["cached_tokens"] == 0 < u1["prompt_tokens_details"]["cached_tokens"]
    assert outs[0].json()["choices"][0]["message"] == outs[1].json()["choices"][0]["message"]
