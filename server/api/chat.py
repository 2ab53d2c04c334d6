"""POST /v1/chat/completions: the model's chat template, then the same engine runs as completions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api import generation
from server.api.deps import EngineDep, ServedDep, StoreDep, TokenizerDep
from server.api.generation import Run, usage
from server.api.metering import Meter, MeterDep
from server.api.inputs import chat_prompt, completion_tokens, off_loop, resolve_adapter, sampling_params, with_grammar
from server.api.streaming import DONE, event, sse
from server.engine import Engine, TokenLogprob
from server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                             ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, Delta,
                             FunctionCall, FunctionCallDelta, NamedToolChoice, ToolCall, ToolCallDelta, TopLogprob,
                             new_id, now)
from server.tools import ParsedCall, ToolCallStream, parse_tool_calls

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(req: ChatCompletionRequest, engine: EngineDep, store: StoreDep,
                           tokenizer: TokenizerDep, served: ServedDep, meter: MeterDep, request: Request):
    """OpenAI chat completion; `stream: true` answers `chat.completion.chunk` events ending with `[DONE]`."""
    adapter = await resolve_adapter(req, served, store, meter.principal, meter.tenancy)
    prompt = await off_loop(chat_prompt, req, tokenizer)
    max_tokens = completion_tokens(req, req.max_completion_tokens or req.max_tokens, len(prompt),
                                   served.max_model_len)
    meter.charge([prompt], req.max_completion_tokens or req.max_tokens, req.n)  # unset: settled at the end
    meter.adapter, meter.user = (adapter.name if adapter else None), req.user
    top = (req.top_logprobs or 0) if req.logprobs else None
    rid = new_id("chatcmpl")
    params = await with_grammar(sampling_params(req, max_tokens, top), req, engine)
    runs = await generation.start(engine, [prompt], params, meter.adapter, req.n, rid, meter.principal.tenant)
    model = adapter.shown if adapter else served.name
    if req.stream:
        meter.streaming = True
        return sse(_stream(engine, runs, req, rid, model, meter))
    results = sorted(await generation.collect_all(engine, runs, request.is_disconnected), key=lambda r: r.index)
    ids = req.return_token_ids
    choices = []
    for r in results:
        message, finish = _message(req, r.text), r.finish_reason
        choices.append(ChatChoice(index=r.index, message=message, finish_reason=_finish(req, finish, message.tool_calls),
                                  logprobs=_logprobs(r.logprobs) if req.logprobs else None,
                                  prompt_token_ids=r.prompt_token_ids if ids else None,
                                  token_ids=r.token_ids if ids else None))
    counts = {r.index: (r.prompt_tokens, r.completion_tokens, r.cached_tokens) for r in results}
    await meter.close(used := usage(counts, req.n))
    return ChatCompletionResponse(id=rid, created=now(), model=model, choices=choices, usage=used)


def _message(req: ChatCompletionRequest, text: str) -> AssistantMessage:
    """The answer as OpenAI's assistant message: with tools, `<tool_call>` blocks become `tool_calls`."""
    if not req.calls_tools():
        return AssistantMessage(content=text)
    content, calls = parse_tool_calls(text)
    return AssistantMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None)


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _finish(req: ChatCompletionRequest, reason: str | None, calls: list | None) -> str | None:
    """OpenAI's finish_reason: `tool_calls` when the model called tools of its own choice (auto, required);
    a call forced by name ends with `stop`, as OpenAI answers."""
    if calls and reason == "stop" and not isinstance(req.tool_choice, NamedToolChoice):
        return "tool_calls"
    return reason


def _logprobs(lps: list[TokenLogprob] | None) -> ChatLogprobs:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top.items()])
        for lp in lps or []])


async def _stream(engine: Engine, runs: list[Run], req: ChatCompletionRequest, rid: str, model: str,
                  meter: Meter) -> AsyncIterator[str]:
    created, counts = now(), {}

    def chunk(choices: list[ChatChunkChoice], **kw) -> str:
        return event(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, **kw))

    parsers = {r.index: ToolCallStream() for r in runs} if req.calls_tools() else {}
    try:
        # OpenAI opens every choice with a delta that carries only the role
        yield chunk([ChatChunkChoice(index=r.index, delta=Delta(role="assistant", content="")) for r in runs])
        async for run, out in generation.interleave(runs):
            counts[run.index] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)
            if not (out.text or out.token_ids or out.finished):
                continue
            parser = parsers.get(run.index)
            yield chunk([ChatChunkChoice(
                index=run.index, delta=_delta(parser, out.text, out.finished),
                logprobs=_logprobs(out.logprobs) if req.logprobs else None,
                finish_reason=_finish(req, out.finish_reason, parser.calls if parser else None),
                token_ids=out.token_ids if req.return_token_ids else None)])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage=usage(counts, req.n))
    except Exception as exc:  # after the 200 went out, an error can only be reported in the stream
        log.exception("chat stream %s failed", rid)
        yield event(generation.stream_error(exc))
    finally:
        await generation.close(engine, runs)
        await meter.close(usage(counts, req.n))
    yield DONE


def _delta(parser: ToolCallStream | None, text: str, finished: bool) -> Delta:
    """The stream delta of new text: plain content, or (with tools) content outside calls plus every call
    completed by this text, each sent whole (id, name and arguments in one delta)."""
    if parser is None:
        return Delta(content=text) if text else Delta()
    content, calls = parser.feed(text)
    if finished:
        content += parser.finish()
    first = len(parser.calls) - len(calls)
    deltas = [ToolCallDelta(index=first + i, id=c.id, type="function",
                            function=FunctionCallDelta(name=c.name, arguments=c.arguments)) for i, c in enumerate(calls)]
    return Delta(content=content or None, tool_calls=deltas or None)
