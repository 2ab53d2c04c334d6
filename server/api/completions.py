"""POST /v1/completions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request

from server.api import echo, generation
from server.api.deps import EngineDep, ServedDep, StoreDep, TokenizerDep
from server.api.generation import Result, Run, usage
from server.api.metering import Meter, MeterDep
from server.api.inputs import completion_prompts, off_loop, resolve_adapter, sampling_params, with_grammar
from server.api.streaming import DONE, event, sse
from server.engine import Engine
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, new_id, now

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, engine: EngineDep, store: StoreDep, tokenizer: TokenizerDep,
                      served: ServedDep, meter: MeterDep, request: Request):
    """OpenAI text completion; `stream: true` answers server-sent events ending with `data: [DONE]`."""
    adapter = await resolve_adapter(req, served, store, meter.principal, meter.tenancy)
    prompts = await off_loop(completion_prompts, req, tokenizer)
    meter.charge(prompts, req.max_tokens, req.n)
    meter.adapter, meter.user = (adapter.name if adapter else None), req.user
    params = replace(sampling_params(req, req.max_tokens, req.logprobs), prompt_logprobs=echo.prompt_logprobs_k(req))
    params = await with_grammar(params, req, engine)
    texts = echo.prompt_texts(req, prompts, tokenizer) if req.echo else None
    rid = new_id("cmpl")
    runs = await generation.start(engine, prompts, params, meter.adapter, req.n, rid, meter.principal.tenant)
    model = adapter.shown if adapter else served.name
    if req.stream:
        meter.streaming = True
        return sse(_stream(engine, runs, req, rid, model, meter, tokenizer, texts))
    results = sorted(await generation.collect_all(engine, runs, request.is_disconnected), key=lambda r: r.index)
    choices = [_choice(req, r, tokenizer, texts[r.index // req.n] if texts else None) for r in results]
    counts = {r.index: (r.prompt_tokens, r.completion_tokens, r.cached_tokens) for r in results}
    await meter.close(used := usage(counts, req.n))
    return CompletionResponse(id=rid, created=now(), model=model, choices=choices, usage=used)


def _choice(req: CompletionRequest, r: Result, tokenizer, prompt_text: str | None) -> CompletionChoice:
    """One choice; with echo the prompt (and its logprobs) comes first."""
    ids, prefix = req.return_token_ids, r.prompt_logprobs if prompt_text is not None else None
    lps = None
    if req.logprobs is not None:
        lps = echo.logprobs(r.prompt_token_ids, prefix, r.logprobs, req.logprobs, tokenizer)
    vllm = None
    if req.prompt_logprobs is not None and r.prompt_logprobs is not None:
        vllm = echo.vllm_prompt_logprobs(r.prompt_logprobs, req.prompt_logprobs, tokenizer)
    return CompletionChoice(index=r.index, text=(prompt_text or "") + r.text, finish_reason=r.finish_reason,
                            logprobs=lps, prompt_logprobs=vllm, prompt_token_ids=r.prompt_token_ids if ids else None,
                            token_ids=r.token_ids if ids else None)


async def _stream(engine: Engine, runs: list[Run], req: CompletionRequest, rid: str, model: str,
                  meter: Meter, tokenizer, texts: list[str] | None) -> AsyncIterator[str]:
    created, offsets, counts = now(), {r.index: 0 for r in runs}, {}
    to_echo = {r.index for r in runs} if texts is not None else set()
    try:
        async for run, out in generation.interleave(runs):
            counts[run.index] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)
            head, prefix = "", None
            if run.index in to_echo:  # a choice's first chunk carries the echoed prompt (and its logprobs)
                to_echo.discard(run.index)
                head, prefix = texts[run.index // req.n], out.prompt_logprobs
            lp = None
            if req.logprobs is not None:
                lp = echo.logprobs(run.request.prompt_token_ids, prefix, out.logprobs, req.logprobs, tokenizer,
                                   offsets[run.index])
            offsets[run.index] += len(head) + len(out.text)
            if not (head or out.text or out.token_ids or out.finished):
                continue
            choice = CompletionChoice(index=run.index, text=head + out.text, logprobs=lp,
                                      finish_reason=out.finish_reason,
                                      token_ids=out.token_ids if req.return_token_ids else None)
            yield event(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        if req.stream_options and req.stream_options.include_usage:
            yield event(CompletionResponse(id=rid, created=created, model=model, choices=[],
                                           usage=usage(counts, req.n)))
    except Exception as exc:  # after the 200 went out, an error can only be reported in the stream
        log.exception("completion stream %s failed", rid)
        yield event(generation.stream_error(exc))
    finally:
        await generation.close(engine, runs)
        await meter.close(usage(counts, req.n))
    yield DONE
