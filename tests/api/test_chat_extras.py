"""Chat fields vLLM clients send (add_generation_prompt, continue_final_message, chat_template_kwargs) through
the tiny model's chat template, and optional CORS."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_tokenizer
from tests.tenancy.conftest import tiny_server

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite", allowed_origins="https://app.example")
    with c:
        yield c


def prompt_ids(client, **body) -> list[int]:
    r = client.post("/v1/chat/completions", json={"max_tokens": 1, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["prompt_token_ids"]


@pytest.mark.parametrize("body,expected", [
    ({"messages": MSGS[:1]}, "<user>hi\n<assistant>"),
    ({"messages": MSGS[:1], "add_generation_prompt": False}, "<user>hi\n"),
    ({"messages": MSGS, "add_generation_prompt": False, "continue_final_message": True}, "<user>hi\n<assistant>Hel"),
])
def test_template_options(client, body, expected):
    assert prompt_ids(client, **body) == tiny_tokenizer().encode(expected)


@pytest.mark.parametrize("body", [
    {"messages": MSGS[:1], "continue_final_message": True, "add_generation_prompt": False},
    {"messages": MSGS, "continue_final_message": True},
    {"messages": MSGS[:1], "chat_template_kwargs": {"add_generation_prompt": True}},
])
def test_bad_combinations_are_400(client, body):
    assert client.post("/v1/chat/completions", json={"max_tokens": 1, **body}).status_code == 400


def test_cors_for_allowed_origins_only(client):
    pre = client.options("/v1/chat/completions", headers={"Origin": "https://app.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_user_is_written_on_the_requests_usage_line(client, caplog):
    with caplog.at_level("INFO", logger="server.api.metering"):
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            r = client.post(path, json=body | {"max_tokens": 2, "user": "end-user-42"})
            assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "server.api.metering"]
    assert len([m for m in lines if 'user="end-user-42"' in m and "completion_tokens=2" in m]) == 2, lines
