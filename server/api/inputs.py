"""Turning an API request into engine inputs: which adapter, which token ids, which sampling parameters."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from server.api.auth import Tenancy
from server.api.deps import Served
from server.engine import SamplingParams
from server.errors import APIError
from server.grammar import GrammarSpec, InvalidGrammar
from server.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields
from server.tools import supports_tools, tool_grammar
from server.store import AdapterNotFound, AdapterStore, InvalidAdapterId
from server.tenancy.access import Resolved, resolve
from server.tenancy.service import Principal

T = TypeVar("T")


_TOKENIZER = threading.Lock()  # one tokenization at a time: templating may reconfigure the (Rust) tokenizer


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Tokenize or apply the chat template in a worker thread: a multi-megabyte prompt never blocks the
    event loop (health checks and other clients' streams go on)."""
    def locked() -> T:
        with _TOKENIZER:
            return fn(*args)

    return await run_in_threadpool(locked)


async def resolve_adapter(req: SamplingFields, served: Served, store: AdapterStore, principal: Principal,
                          tenancy: Tenancy) -> Resolved | None:
    """The adapter a request names (`adapter_id`, else `model` when it is not the base model), resolved for
    the caller, or None for the base model.

    An adapter that is not in the store, or that the caller may not use, is a 404: a request for an adapter is
    never served by the base model, and another tenant's adapter looks exactly like a missing one.
    """
    if req.adapter_id is not None:
        name, param = req.adapter_id, "adapter_id"
        if req.model not in (None, "", served.name, name):
            raise APIError(400, f"model {req.model!r} and adapter_id {name!r} disagree: set model to the "
                                f"base model {served.name!r} or to the adapter id", param="model")
    elif req.model and req.model != served.name:
        name, param = req.model, "model"
    else:
        return None
    try:
        ref = await run_in_threadpool(resolve, principal, name, write=False, is_public=tenancy.service.is_public)
    except InvalidAdapterId as exc:
        raise APIError(400, str(exc), param=param, code="invalid_adapter_id") from None
    except AdapterNotFound:
        ref = None
    if ref is None or not await run_in_threadpool(store.exists, ref.name):
        raise APIError(404, f"{param} {name!r} is neither the base model {served.name!r} nor a stored "
                            "adapter (see GET /v1/models)", param=param, code="model_not_found")
    return ref


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The engine's parameters; `max_tokens` None (a completion's explicit null) is OpenAI's default, 16."""
    return SamplingParams(presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                          repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                          logit_bias=tuple((int(k), v) for k, v in (req.logit_bias or {}).items()),
                          stop_token_ids=tuple(req.stop_token_ids or ()),
                          max_tokens=16 if max_tokens is None else max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, seed=req.seed, stop=tuple(req.stop), ignore_eos=req.ignore_eos,
                          logprobs=logprobs, cache_salt=req.cache_salt)


def grammar_spec(req: SamplingFields) -> GrammarSpec | None:
    """What structured output the request asks for (response_format, vLLM's structured_outputs, or tool calls
    in the tools' argument schemas), if any."""
    if isinstance(req, ChatCompletionRequest) and req.calls_tools():
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            return GrammarSpec("structural_tag", tool_grammar(tools, choice or "auto", req.parallel_tool_calls))
        except ValueError as exc:  # xgrammar refuses the tools (pydantic's ValidationError is a ValueError)
            raise APIError(400, f"tools: {str(exc)[:300]}", param="tools", code="invalid_schema") from None
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and rf.type == "json_object":
        return GrammarSpec("json")
    if rf is not None and rf.type == "json_schema":
        return GrammarSpec.json_schema(rf.json_schema.schema_)
    if so is None:
        return None
    if so.json_object:
        return GrammarSpec("json")
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise APIError(400, "structured_outputs.json must be a JSON schema", param="structured_outputs") from None
        return GrammarSpec.json_schema(schema)
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    return GrammarSpec.choice(so.choice or [])


async def with_grammar(params: SamplingParams, req: SamplingFields, engine: Any) -> SamplingParams:
    """`params` with the request's compiled grammar (compiled in a worker thread, cached by spec hash)."""
    spec = grammar_spec(req)
    if spec is None:
        return params
    try:
        compiled = await run_in_threadpool(engine.grammars.compile, spec)
    except InvalidGrammar as exc:
        param = "tools" if spec.kind == "structural_tag" else "response_format"
        raise APIError(400, str(exc), param=param, code="invalid_schema") from None
    return replace(params, grammar=compiled)


def completion_prompts(req: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    vocab = len(tokenizer)
    out = []
    for p in req.prompts():
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """The model's chat template applied to the messages (and tools), ending with the assistant's turn."""
    if req.calls_tools() and not supports_tools(tokenizer.chat_template):
        raise APIError(400, "this server's chat template has no tool support, so the model would never see the "
                            "tools: start it with --chat-template chatml-tools (bundled, for ChatML models) or a "
                            "template of your own that renders `tools`", param="tools", code="tools_not_supported")
    messages = [_template_message(m) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                            continue_final_message=req.continue_final_message, tokenize=True,
                                            **(req.chat_template_kwargs or {}))
    except Exception as exc:  # jinja raises TemplateError (e.g. roles out of order) or ValueError (no template)
        raise APIError(400, f"messages do not fit the model's chat template: {exc}", param="messages") from None
    if hasattr(ids, "keys"):  # transformers 5 answers a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


def _template_message(m: Any) -> dict[str, Any]:
    """A message as chat templates read it: tool calls' arguments as objects (templates write them with
    `tojson`), the tool message's call id."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise APIError(400, "a tool call's function.arguments must be a JSON text", param="messages") from None


def completion_tokens(req: SamplingFields, requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """max_tokens as asked, or (left out) whatever room the context has."""
    if requested is not None:
        return requested
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room in the context of "
                            f"{max_model_len} tokens", param="messages", code="context_length_exceeded")
    return room
