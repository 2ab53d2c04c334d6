"""Function calling on a tiny random model (it writes nonsense: only the grammar makes its calls valid):
`required` and named calls always parse and follow the tool's argument schema, `parallel_tool_calls`, streamed
deltas add up to the non-streamed calls, history with tool calls and tool messages reaches the template, and
every misuse is a 400."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import tiny_tokenizer
from tests.tenancy.conftest import tiny_server

# compact enough for the tiny model's 256-token context (a character-level tokenizer)
TEMPLATE = ("{%- if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>\n{% endif -%}"
            "{%- for m in messages -%}<{{ m['role'] }}>{{ m['content'] }}"
            "{% for c in m.get('tool_calls') or [] %}<call>{{ c['function']['name'] }}{{ c['function']['arguments'] | tojson }}</call>{% endfor %}"
            "{% if m.get('tool_call_id') %}[{{ m['tool_call_id'] }}]{% endif %}\n{% endfor -%}"
            "{%- if add_generation_prompt %}<assistant>{% endif -%}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    (tmp / "tools.jinja").write_text(TEMPLATE)
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite", max_model_len=256,
                          chat_template=str(tmp / "tools.jinja"))
    with c:
        yield c


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The tiny model's own template, which has no tools."""
    tmp = tmp_path_factory.mktemp("plain")
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite", max_model_len=256)
    with c:
        yield c


def chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 100,
                                                  "temperature": 0.9, "seed": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def valid_calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, SCHEMAS[call["function"]["name"]])
        out.append((call["function"]["name"], args))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_required_always_calls_a_tool_with_valid_arguments(client, seed):
    ch = chat(client, tool_choice="required", parallel_tool_calls=False, seed=seed)
    if ch["finish_reason"] == "length":
        pytest.skip("cut by max_tokens")  # cannot happen with these small schemas; kept honest
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    assert len(valid_calls(ch["message"])) == 1


@pytest.mark.parametrize("seed", range(3))
def test_named_function_is_the_one_called(client, seed):
    ch = chat(client, tool_choice={"type": "function", "function": {"name": "add"}}, seed=seed)
    assert ch["finish_reason"] == "stop"  # as OpenAI answers a forced call
    assert [name for name, _ in valid_calls(ch["message"])] == ["add"]


def test_parallel_calls_each_valid(client):
    counts = set()
    for seed in range(6):
        ch = chat(client, tool_choice="required", parallel_tool_calls=True, seed=seed, max_tokens=190)
        if ch["finish_reason"] == "tool_calls":
            counts.add(len(valid_calls(ch["message"])))
    assert counts and min(counts) >= 1


def test_auto_answers_text_or_valid_calls(client):
    for seed in range(4):
        ch = chat(client, tool_choice="auto", seed=seed)
        if ch["message"].get("tool_calls"):
            valid_calls(ch["message"])
            assert ch["finish_reason"] in ("tool_calls", "length")
        else:
            assert isinstance(ch["message"]["content"], str)


def test_streamed_deltas_add_up_to_the_same_calls(client):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 100, "seed": 5,
            "temperature": 0.9}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    calls: dict[int, dict] = {}
    finish = None
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            for d in choice["delta"].get("tool_calls") or []:
                c = calls.setdefault(d["index"], {"id": d.get("id"), "name": "", "arguments": ""})
                c["name"] += d["function"].get("name") or ""
                c["arguments"] += d["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    streamed = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert streamed == valid_calls(whole["message"])
    assert finish == whole["finish_reason"] == "tool_calls"
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_history_with_calls_and_tool_results_reaches_the_template(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    r = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 4,
                                                  "return_token_ids": True, "temperature": 0})
    assert r.status_code == 200, r.text
    prompt = tiny_tokenizer().decode(r.json()["choices"][0]["prompt_token_ids"])
    assert prompt.endswith('<user>weather?<assistant><call>add{"a": 1, "b": 2}</call><tool>3[call_1]<assistant>')
    assert prompt.startswith("<tools>get_weather;add;</tools>")


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "tools"),
    ({"ignore_eos": True}, "ignore_eos"),
    ({"tools": TOOLS + TOOLS[:1]}, "distinct"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": ASK + [{"role": "tool", "content": "3"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, None),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{not json"}}]}]}, "arguments"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_misuse_is_a_400(client, extra, needle):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4} | extra)
    if needle is None:  # an empty tool_calls list on a user message is harmless
        assert r.status_code in (200, 400), r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err.get("param")), err


def test_template_without_tools_is_a_clear_400(plain):
    r = plain.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "tools_not_supported" and err["param"] == "tools" and "--chat-template" in err["message"]
    # tool_choice none asks for no calls: the answer is plain text, as without tools
    r = plain.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "tool_choice": "none",
                                                 "max_tokens": 4})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


def test_tools_on_completions_point_to_chat(client):
    r = client.post("/v1/completions", json={"prompt": "x", "tools": TOOLS})
    assert r.status_code == 400 and "chat" in r.json()["error"]["message"]
