"""POST /v1/completions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api import generation
from server.api.deps import EngineDep, ServedDep, StoreDep, TokenizerDep
from server.api.generation import Run, usage
from server.api.metering import Meter, MeterDep
from server.api.inputs import completion_prompts, off_loop, resolve_adapter, sampling_params
from server.api.streaming import DONE, event, sse
from server.engine import Engine, TokenLogprob
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, new_id, now

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, engine: EngineDep, store: StoreDep, tokenizer: TokenizerDep,
                      served: ServedDep, meter: MeterDep, request: Request):
    """OpenAI text completion; `stream: true` answers server-sent events ending with `data: [DONE]`."""
    adapter = await resolve_adapter(req, served, store, meter.principal, meter.tenancy)
    prompts = await off_loop(completion_prompts, req, tokenizer)
    meter.charge(prompts, req.max_tokens, req.n)
    meter.adapter = adapter.name if adapter else None
    params = sampling_params(req, req.max_tokens, req.logprobs)
    rid = new_id("cmpl")
    runs = await generation.start(engine, prompts, params, meter.adapter, req.n, rid, meter.principal.tenant)
    model = adapter.shown if adapter else served.name
    if req.stream:
        meter.streaming = True
        return sse(_stream(engine, runs, req, rid, model, meter))
    results = sorted(await generation.collect_all(engine, runs, request.is_disconnected), key=lambda r: r.index)
    ids = req.return_token_ids
    choices = [CompletionChoice(index=r.index, text=r.text, finish_reason=r.finish_reason,
                                logprobs=_logprobs(r.logprobs, 0) if req.logprobs is not None else None,
                                prompt_token_ids=r.prompt_token_ids if ids else None,
                                token_ids=r.token_ids if ids else None)
               for r in results]
    counts = {r.index: (r.prompt_tokens, r.completion_tokens) for r in results}
    await meter.close(used := usage(counts, req.n))
    return CompletionResponse(id=rid, created=now(), model=model, choices=choices, usage=used)


def _logprobs(lps: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps or []:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(dict(lp.top))
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


async def _stream(engine: Engine, runs: list[Run], req: CompletionRequest, rid: str, model: str,
                  meter: Meter) -> AsyncIterator[str]:
    created, offsets, counts = now(), {r.index: 0 for r in runs}, {}
    try:
        async for run, out in generation.interleave(runs):
            counts[run.index] = (out.prompt_tokens, out.completion_tokens)
            lp = _logprobs(out.logprobs, offsets[run.index]) if req.logprobs is not None else None
            offsets[run.index] += len(out.text)
            if not (out.text or out.token_ids or out.finished):
                continue
            choice = CompletionChoice(index=run.index, text=out.text, logprobs=lp, finish_reason=out.finish_reason,
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
