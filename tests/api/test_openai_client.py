"""The official openai client against the real server: chat and completions, plain and streamed, with an
adapter named through extra_body={"adapter_id": ...} and as the model."""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import PROMPT, complete, upload

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_completions_and_chat(oai, client, reference):
    assert upload(client, "oai-lora", reference.adapter("lora", seed=31, rank=4)).status_code in (200, 201)
    base = reference.base.name
    raw = complete(client, PROMPT, 8, adapter_id="oai-lora")["choices"][0]["text"]

    c = oai.completions.create(model=base, prompt=PROMPT, max_tokens=8, temperature=0,
                               extra_body={"adapter_id": "oai-lora", "ignore_eos": True})
    assert c.choices[0].text == raw and c.model == "oai-lora" and c.usage.completion_tokens == 8
    streamed = oai.completions.create(model="oai-lora", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == raw

    messages = [{"role": "user", "content": "Say hello."}]
    chat = oai.chat.completions.create(model=base, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"adapter_id": "oai-lora"})
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.model == "oai-lora"
    stream = oai.chat.completions.create(model="oai-lora", messages=messages, max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text

    models = [m.id for m in oai.models.list()]
    assert models[0] == base and "oai-lora" in models
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-adapter", messages=messages, max_tokens=4)
