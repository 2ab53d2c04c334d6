"""The OpenAI surface on the default model over real HTTP: 32 requests at once, half constrained to three JSON
schemas (nested objects, enums, arrays) and half free, over several adapters — every constrained answer parses
and validates, every free row gets its solo tokens; and a tool-call round trip with the official openai client
(call -> tool message -> final answer) on a server started with the bundled tool template."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.api.conftest import complete, upload
from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.e2e

SCHEMAS = [
    {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                   "required": ["name", "age"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]}},
     "required": ["person", "role"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "score": {"type": "number"}},
     "required": ["tags", "score"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"}},
     "required": ["items", "express"], "additionalProperties": False},
]
ADAPTERS = [("surface-osora", "osora", 41), ("surface-loraxs", "loraxs", 42), ("surface-lora", "lora", 43), (None, None, 0)]


def test_32_rows_half_constrained_over_adapters(client, reference):
    for name, method, seed in ADAPTERS[:3]:
        assert upload(client, name, reference.adapter(method, seed=seed, rank=4)).status_code in (200, 201)
    jobs = []
    for i in range(32):
        adapter = ADAPTERS[i % 4][0]
        body = {"adapter_id": adapter} if adapter else {}
        if i % 2:  # constrained: chat with a JSON schema, sampled
            schema = SCHEMAS[(i // 2) % 3]
            jobs.append(("schema", schema, {"messages": [{"role": "user", "content": f"Describe thing {i} as JSON."}],
                                            "max_tokens": 120, "temperature": 0.7, "seed": i,
                                            "response_format": {"type": "json_schema", "json_schema": {
                                                "name": f"s{i}", "schema": schema, "strict": True}}, **body}))
        else:  # free: a greedy completion, compared with the same request alone
            jobs.append(("free", None, {"prompt": f"Item {i}: the capital of France is", "max_tokens": 12,
                                        "temperature": 0, "ignore_eos": True, "return_token_ids": True, **body}))
    solo = {i: complete(client, **{k: v for k, v in body.items() if k != "prompt"}, prompt=body["prompt"])
            ["choices"][0]["token_ids"] for i, (kind, _, body) in enumerate(jobs) if kind == "free"}

    def send(job):
        kind, _, body = job
        return client.post("/v1/chat/completions" if kind == "schema" else "/v1/completions", json=body)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, jobs))
    parsed = 0
    for i, ((kind, schema, _), r) in enumerate(zip(jobs, answers)):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if kind == "free":
            assert choice["token_ids"] == solo[i], f"row {i} differs from its solo run"
        elif choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            parsed += 1
        else:
            assert choice["finish_reason"] == "length"
    assert parsed >= 12, f"only {parsed} of 16 constrained answers finished within max_tokens"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("tools"), "--chat-template", "chatml-tools", "--max-batch-size", "4")
    try:
        yield srv
    finally:
        stop_server(srv)


def test_tool_call_round_trip_with_the_openai_client(tool_server):
    oai = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    base = oai.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.chat.completions.create(model=base, messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=60, temperature=0)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) >= 1
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    streamed = oai.chat.completions.create(model=base, messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=60, temperature=0, stream=True)
    args, names = "", ""
    for chunk in streamed:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names += d.function.name or ""
            args += d.function.arguments or ""
    assert names == "get_weather" and json.loads(args) == json.loads(call.function.arguments)

    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    final = oai.chat.completions.create(model=base, messages=messages, tools=[WEATHER], max_tokens=30, temperature=0)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_bundled_template_renders_plain_chats_as_the_models_own(reference):
    from server.tools import load_chat_template

    tok = reference.base.tokenizer
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for messages in chats:
        own = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bundled = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                          chat_template=load_chat_template("chatml-tools"))
        assert bundled == own
