"""Bad input is a clear 4xx in OpenAI's shape — never a 500 — by construction, with generated cases: values of
the wrong JSON type for every request field (pydantic may not coerce them), numbers beyond 64 bits, null,
lone surrogates, deep nesting, oversized and stalled bodies; plus the OpenAI shapes clients rely on."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tenancy.conftest import tiny_server

FIELDS = {  # field -> a valid value; every other JSON type must be refused
    "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "n": 1, "seed": 1, "stream": False,
    "ignore_eos": True, "return_token_ids": True, "logprobs": 1, "user": "u", "stop": "x", "model": None,
    "adapter_id": None, "echo": False,
}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
                           max_leaves=8)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite", max_request_bytes=8192,
                          upload_timeout_seconds=1.0)
    with c:
        yield c


def _is_4xx_in_openai_shape(r, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] and err["message"]
    return err


def _valid_for(field: str, value) -> bool:
    ok = FIELDS[field]
    if field == "stop":
        return isinstance(value, str) and value != "" or (isinstance(value, list) and all(
            isinstance(s, str) and s for s in value) and len(value) <= 16)
    if field in ("model", "adapter_id", "user"):
        return value is None or isinstance(value, str)
    if type(ok) is float:
        return type(value) in (int, float) and 0 < value <= 1
    if type(ok) is int:
        return type(value) is int
    return type(value) is type(ok)


@pytest.mark.parametrize("field", sorted(FIELDS))
@SETTINGS
@given(value=json_values)
def test_every_field_of_the_wrong_type_is_a_400(client, field, value):
    if _valid_for(field, value):
        return
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code < 500, r.text
    if not (field in ("model", "adapter_id") and value is None):
        if r.status_code == 200:  # only values that are valid after all (e.g. an int in range)
            assert not isinstance(value, (bool, dict)) or field in ("stream", "ignore_eos", "echo")
        else:
            _is_4xx_in_openai_shape(r)


@pytest.mark.parametrize("body,words", [
    ({"prompt": "hi", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": [True, 5]}, "prompt"),
    ({"prompt": [[1, 2], [3, True]]}, "prompt"),
    ({"prompt": [1, 2**70]}, "prompt"),
    ({"prompt": "hi", "max_tokens": 2**80}, "max_tokens"),
    ({"prompt": "hi", "seed": 2**64}, "seed"),
    ({"prompt": "hi", "temperature": None}, "temperature"),
    ({"prompt": "hi", "n": None}, "n"),
    ({"prompt": "hi", "top_k": 1.5}, "top_k"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
    ({"prompt": "hi", "tool_choice": "auto"}, "tool_choice"),
])
def test_named_cases_are_400_and_say_what_is_wrong(client, body, words):
    err = _is_4xx_in_openai_shape(client.post("/v1/completions", json=body), 400)
    assert words in err["message"] or words == err["param"], err


@pytest.mark.parametrize("where", ["prompt", "stop", "message", "adapter_id", "model"])
def test_lone_surrogates_are_a_400(client, where):
    bad = "a\ud800b"
    if where == "message":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": bad}]}
    else:
        path, body = "/v1/completions", {"prompt": "hi", where: bad}
    raw = json.dumps(body)  # json.dumps escapes the surrogate as \\ud800, which Python's parser accepts
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    err = _is_4xx_in_openai_shape(r, 400)
    assert "unicode" in err["message"].lower() or "surrogate" in err["message"], err


@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000, '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}",
                                 '{"prompt": "hi", "max_tokens": 1' + "0" * 5000 + "}",
                                 '{"prompt": "hi", "temperature": 1e400}', '{"prompt": NaN}', "\xff\xfe"])
def test_pathological_json_is_a_4xx(client, raw):
    r = client.post("/v1/completions", content=raw.encode("utf-8", "surrogateescape")[:8000],
                    headers={"content-type": "application/json"})
    _is_4xx_in_openai_shape(r)


def test_body_limits(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 10_000})
    assert _is_4xx_in_openai_shape(r, 413)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: refused while reading
        for _ in range(20):
            yield b" " * 1000

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _is_4xx_in_openai_shape(r, 413)


def test_a_request_that_could_never_be_queued_is_a_400_not_a_429(client):
    r = client.post("/v1/completions", json={"prompt": ["a"] * 20, "n": 16, "max_tokens": 1})
    err = _is_4xx_in_openai_shape(r, 400)
    assert "--max-queue" in err["message"]


def test_openai_shapes(client):
    base = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{base}").json()["id"] == base
    err = _is_4xx_in_openai_shape(client.get("/v1/models/nope"), 404)
    assert err["code"] == "model_not_found"
    err = _is_4xx_in_openai_shape(client.post("/v1/completions", json={"prompt": "hi", "model": "nope"}), 404)
    assert err["code"] == "model_not_found"
    err = _is_4xx_in_openai_shape(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500}), 400)
    assert err["code"] == "context_length_exceeded"
    neutral = {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "text"}, "tools": [],
               "tool_choice": "none", "presence_penalty": None, "seed": -(2**63)}
    assert client.post("/v1/completions", json=neutral).status_code == 200
    for seed in (2**64 - 1, -1):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "seed": seed, "n": 2})
        assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logprobs": 0, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and len(lp["token_logprobs"]) == 2 and lp["top_logprobs"] == [{}, {}]
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": None}).status_code == 200


def test_options_answers_the_methods_of_a_path(client):
    r = client.options("/adapters/x")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"DELETE", "GET", "OPTIONS", "PATCH", "PUT"}
    assert set(client.options("/v1/completions").headers["allow"].split(", ")) == {"OPTIONS", "POST"}
    _is_4xx_in_openai_shape(client.options("/nowhere"), 404)
    assert "422" not in json.dumps(client.get("/openapi.json").json()["paths"])
