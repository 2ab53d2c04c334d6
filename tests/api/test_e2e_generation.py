"""End to end on the default model: upload adapters over HTTP, then generate with them (plain, streamed,
chat, concurrent), checked against the in-process dense reference."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.api.conftest import PROMPT, complete, sse_events, upload

pytestmark = pytest.mark.e2e
N_TOKENS = 8
# (method, rank): every adapter family the server serves from the shared factors, plus PEFT LoRA
TEST_CASES = [("osora", 8), ("loraxs", 8), ("vera", 8), ("lora", 8)]


def test_health_and_base_model_first(client, reference):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == reference.base.name and models["data"][0]["parent"] is None


@pytest.mark.parametrize("method,rank", TEST_CASES)
def test_upload_then_complete_matches_dense_reference(client, reference, method, rank):
    adapter = reference.adapter(method, seed=11, rank=rank)
    r = upload(client, f"gen-{method}", adapter)
    assert r.status_code in (200, 201), r.text
    assert r.json()["method"] == method and r.json()["rank"] == rank
    ids = reference.encode(PROMPT)

    body = complete(client, PROMPT, N_TOKENS, adapter_id=f"gen-{method}")
    choice = body["choices"][0]
    assert body["model"] == f"gen-{method}"
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == reference.greedy(ids, N_TOKENS, adapter)
    base = complete(client, PROMPT, N_TOKENS)["choices"][0]
    assert base["token_ids"] == reference.greedy(ids, N_TOKENS)
    assert choice["token_ids"] != base["token_ids"], "the adapter should change the greedy output"
    usage = body["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]  # earlier tests may have cached its prefix
    assert 0 <= cached < len(ids) and cached % 16 == 0
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": N_TOKENS, "total_tokens": len(ids) + N_TOKENS}

    # the same request streamed: same text, OpenAI chunks, ends with [DONE]
    req = {"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
           "model": f"gen-{method}"}
    with client.stream("POST", "/v1/completions", json=req) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == f"gen-{method}" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_with_adapter_as_model(client, reference):
    adapter = reference.adapter("osora", seed=5)
    assert upload(client, "chat-osora", adapter).status_code in (200, 201)
    messages = [{"role": "user", "content": "Name a color."}]
    r = client.post("/v1/chat/completions", json={"model": "chat-osora", "messages": messages, "max_tokens": N_TOKENS,
                                                  "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    ids = body["choices"][0]["prompt_token_ids"]
    enc = reference.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    assert body["choices"][0]["token_ids"] == reference.greedy(ids, N_TOKENS, adapter)


def test_unknown_adapter_is_404_never_the_base_model(client):
    for body in ({"adapter_id": "no-such-adapter"}, {"model": "no-such-adapter"},
                 {"model": "no-such-adapter", "stream": True}):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert "no-such-adapter" in err["message"] and err["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"model": "no-such-adapter",
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404


def test_16_concurrent_requests_over_16_adapters_match_alone(client, server, reference):
    methods = ["osora", "loraxs", "vera", "lora"]
    ids = [f"conc-{i}" for i in range(16)]
    for i, adapter_id in enumerate(ids):
        adapter = reference.adapter(methods[i % 4], seed=100 + i, rank=4 + 4 * (i % 2))
        assert upload(client, adapter_id, adapter).status_code in (200, 201)
    alone = {a: complete(client, PROMPT, N_TOKENS, adapter_id=a)["choices"][0]["token_ids"] for a in ids}
    assert len({tuple(t) for t in alone.values()}) > 1

    async def together() -> dict[str, list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            async def one(a: str) -> list[int]:
                r = await ac.post("/v1/completions", json={
                    "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "adapter_id": a})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]
            return dict(zip(ids, await asyncio.gather(*(one(a) for a in ids))))

    assert asyncio.run(together()) == alone
