"""Completions `echo` with prompt logprobs (what lm-evaluation-harness's local-completions sends for
log-likelihoods: echo, logprobs, max_tokens 0) and vLLM's prompt_logprobs, against the reference model's
log-softmax over the prompt."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tenancy.conftest import tiny_server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("echo")
    c, base, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite")
    with c:
        yield c, base


def reference_logprobs(base, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = base.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_returns_the_prompt_and_its_logprobs(tiny, max_tokens):
    client, base = tiny
    prompt = "the quick brown fox"
    r = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": max_tokens,
                                             "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    ids = ch["prompt_token_ids"]
    assert ch["text"].startswith(prompt) and len(ch["token_ids"]) == max_tokens
    lp = ch["logprobs"]
    assert lp["tokens"][: len(ids)] == [base.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(reference_logprobs(base, ids), abs=1e-4)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["text_offset"][len(ids)] == len(prompt) if max_tokens else True
    assert r.json()["usage"]["completion_tokens"] == max_tokens


def test_vllm_prompt_logprobs(tiny):
    client, base = tiny
    r = client.post("/v1/completions", json={"prompt": "hello world", "prompt_logprobs": 1, "max_tokens": 1,
                                             "return_token_ids": True})
    ch = r.json()["choices"][0]
    ids, plp = ch["prompt_token_ids"], ch["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    ref = reference_logprobs(base, ids)
    for i, entry in enumerate(plp[1:]):
        assert entry[str(ids[i + 1])]["logprob"] == pytest.approx(ref[i], abs=1e-4)
        assert any(e["rank"] == 1 for e in entry.values())


def test_streamed_echo_starts_with_the_prompt(tiny):
    client, _ = tiny
    body = {"prompt": "abc", "echo": True, "max_tokens": 3, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    plain = client.post("/v1/completions", json={**body, "stream": False, "echo": False}).json()
    assert text == "abc" + plain["choices"][0]["text"]


def test_max_tokens_0_without_echo_is_a_400(tiny):
    client, _ = tiny
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
