"""The HTTP layer on a tiny random model (in-process, seconds): request validation answers 400 in OpenAI's
shape, never a 500; response and stream shapes; n, stop, logprobs; adapter routes."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter
from server.app import create_app
from server.config import Settings, build_config
from tests.conftest import tiny_chat_model

R_MAX = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tiny_chat_model()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    model = AdaptedModel(base, factors, n_slots=5)
    config = build_config(Settings(store=str(tmp_path_factory.mktemp("store")), max_rank=R_MAX, device="cpu",
                                   max_resident_adapters=4, max_model_len=96, max_adapter_bytes=4096))
    with TestClient(create_app(config, model=model), raise_server_exceptions=False) as client:
        yield client, spec, factors


@pytest.fixture
def client(tiny):
    return tiny[0]


def _adapter_bytes(tiny, method="osora", seed=0, rank=4) -> bytes:
    _, spec, factors = tiny
    return random_adapter(method, spec, factors, rank=rank, seed=seed).to_bytes()


BAD_REQUESTS = [
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "bogus": 1}, "bogus"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"word": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, "max_model_len"),
    ("/v1/completions", {"prompt": "hi", "adapter_id": "../etc"}, "adapter id"),
    ("/v1/completions", {"prompt": "hi", "adapter_id": "a", "model": "b"}, "disagree"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200}]}, "context"),
]


@pytest.mark.parametrize("path,body,words", BAD_REQUESTS)
def test_bad_request_is_400_in_openai_shape(client, path, body, words):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert words in err["message"] or words == err["param"], err


def test_malformed_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405


def test_completion_shape_n_seed_stop_and_logprobs(client):
    body = {"prompt": ["ab", "cd"], "max_tokens": 6, "n": 2, "seed": 7, "logprobs": 2, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 24, "total_tokens": 28,
                            "prompt_tokens_details": {"cached_tokens": 0}}  # no full 16-token block to reuse
    for c in out["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == c["text"]
        for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]):  # 2 alternatives (+ the sampled one)
            assert 2 <= len(top) <= 3 and chosen <= max(top.values()) + 1e-6
        assert lp["text_offset"] == list(range(6))  # one character per token
    again = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]  # same seed, same text

    greedy = {"prompt": "ab", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    stop = text[3:5]
    cut = client.post("/v1/completions", json={**greedy, "stop": stop}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_chat_stream_shape(client):
    body = {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    plain = client.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert plain["choices"][0]["message"]["content"] == text
    assert len(plain["choices"][0]["logprobs"]["content"]) == 5


def test_adapter_routes_and_generation(client, tiny):
    data = _adapter_bytes(tiny, "loraxs", seed=1)
    r = client.put("/adapters/t1", content=data)
    assert r.status_code == 201 and r.json()["method"] == "loraxs" and r.json()["bytes"] == len(data)
    assert client.put("/adapters/t1", content=data).status_code == 200
    greedy = {"prompt": "abc", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    base = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    adapted = client.post("/v1/completions", json={**greedy, "model": "t1"}).json()
    assert adapted["model"] == "t1"
    assert client.post("/v1/completions", json={**greedy, "adapter_id": "t1"}).json()["choices"][0]["text"] == \
        adapted["choices"][0]["text"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama", "t1"]
    assert client.delete("/adapters/t1").status_code == 200
    assert client.post("/v1/completions", json={**greedy, "model": "t1"}).status_code == 404
    assert client.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == base


def test_upload_limits(client, tiny):
    r = client.put("/adapters/big", content=b"\0" * 5000)
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    assert client.put("/adapters/a..b!", content=_adapter_bytes(tiny)).status_code == 400
    assert client.get("/adapters").json()["data"] == []


def test_metrics_are_prometheus_text(client):
    text = client.get("/metrics").text
    samples = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert {"svdserve_running", "svdserve_waiting", "svdserve_requests_total"} <= set(samples)
    assert "# TYPE svdserve_requests_total counter" in text and "# TYPE svdserve_running gauge" in text


def test_engine_errors_map_to_status_codes():
    from adapters.file import AdapterFormatError
    from server.engine import QueueFull
    from server.errors import as_api_error
    from server.store import AdapterNotFound, InvalidAdapterId

    cases = [(QueueFull("queue full"), 429), (AdapterNotFound("x"), 404), (InvalidAdapterId("bad"), 400),
             (AdapterFormatError("shape"), 400), (ValueError("prompt too long"), 400)]
    for exc, status in cases:
        assert as_api_error(exc).status == status, exc
    with pytest.raises(RuntimeError):  # a bug stays a bug (a 500), not a 4xx
        as_api_error(RuntimeError("boom"))
