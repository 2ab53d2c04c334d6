"""From an API request to engine runs and back: submit, collect, stream.

One API request becomes one engine request per (prompt, choice). Every run is *primed* (driven to its first
output) before the HTTP response starts, so the engine's validation errors (unknown adapter, full queue, prompt
too long) become 4xx answers instead of a broken 200 stream. A run whose consumer goes away is aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from starlette.concurrency import run_in_threadpool

from server.engine import Engine, GenerationFailed, GenerationRequest, RequestOutput, SamplingParams, TokenLogprob
from server.errors import APIError, as_api_error, error_body
from server.protocol import PromptTokensDetails, Usage
from server.sequence import PromptLogprob

DISCONNECT_POLL_S = 0.5


@dataclass
class Run:
    """One engine request in flight; `index` is the choice index in the API response."""

    index: int
    request: GenerationRequest
    outputs: AsyncIterator[RequestOutput]
    first: RequestOutput | None = None
    finished: bool = False
    observer: object | None = None  # the app's metrics (server.metrics.Metrics), told of every output


@dataclass
class Result:
    """A run collected to the end."""

    index: int
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[PromptLogprob | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


async def _prime(run: Run) -> None:
    outputs = run.outputs
    if asyncio.iscoroutine(outputs):  # tolerate `async def generate` returning an iterator
        run.outputs = outputs = await outputs
    run.first = await anext(outputs)
    run.finished = run.first.finished
    if run.observer is not None:
        run.observer.output(run.request.request_id, run.first)


async def start(engine: Engine, prompts: list[list[int]], params: SamplingParams, adapter_id: str | None,
                n: int, request_id: str, tenant: str = "") -> list[Run]:
    """Submit n runs per prompt (seed, seed+1, ... per choice) and prime them together. `adapter_id` is the
    canonical `tenant/id`; `tenant` is whose request it is (fair admission)."""
    if len(prompts) * n > engine.config.max_queue:
        raise APIError(400, f"{len(prompts)} prompts x n={n} make {len(prompts) * n} requests, more than the "
                            f"server's queue holds ({engine.config.max_queue}, --max-queue): send fewer at once",
                       param="n", code="too_many_requests_in_one")
    stored = image = None
    if adapter_id is not None:  # in a worker thread: an S3 store may read its index and download the file, a
        try:                    # cold adapter is parsed and laid out for its slot (Engine.resolve)
            stored, image = await run_in_threadpool(engine.resolve, adapter_id)
        except Exception as exc:
            raise as_api_error(exc) from None
    runs = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            seeded = params if params.seed is None or i == 0 else _with_seed(params, _next_seed(params.seed, i))
            req = GenerationRequest(request_id=f"{request_id}-{p * n + i}", prompt_token_ids=ids,
                                    params=seeded, adapter_id=adapter_id, tenant=tenant, stored=stored,
                                    image=image)
            observer = getattr(engine, "observer", None)
            if observer is not None:
                observer.submitted(req.request_id, tenant)
            runs.append(Run(index=p * n + i, request=req, outputs=engine.generate(req), observer=observer))
    results = await asyncio.gather(*(_prime(r) for r in runs), return_exceptions=True)
    errors = [e for e in results if isinstance(e, BaseException)]
    errors += [GenerationFailed(r.first.error) for r in runs if r.first is not None and r.first.finish_reason == "error"]
    if errors:
        await close(engine, runs)
        raise as_api_error(errors[0]) if isinstance(errors[0], Exception) else errors[0]
    return runs


def _next_seed(seed: int, i: int) -> int:
    """seed + i, wrapped to stay a 64-bit seed (what torch.Generator.manual_seed takes)."""
    s = seed + i
    return s - 2**64 if s > 2**64 - 1 else s


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


async def close(engine: Engine, runs: list[Run]) -> None:
    """Abort every unfinished run and close its iterator (safe to call more than once)."""
    for run in runs:
        if not run.finished:
            engine.abort(run.request.request_id)
            run.finished = True
            if run.observer is not None:
                run.observer.abandoned(run.request.request_id)
        aclose = getattr(run.outputs, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # the iterator may already be closed or mid-cancellation
                pass


async def outputs(run: Run) -> AsyncIterator[RequestOutput]:
    """Every output of a primed run, the first one included. Raises GenerationFailed when the engine failed
    the request."""
    assert run.first is not None
    out = run.first
    if not out.finished:
        async for out in _rest(run):
            yield out
        return
    if out.finish_reason == "error":
        raise GenerationFailed(out.error)
    yield out


async def _rest(run: Run) -> AsyncIterator[RequestOutput]:
    yield run.first
    async for out in run.outputs:
        if run.observer is not None:
            run.observer.output(run.request.request_id, out)
        if out.finished:
            run.finished = True
            if out.finish_reason == "error":
                raise GenerationFailed(out.error)
        yield out
        if out.finished:
            return


async def collect(run: Run) -> Result:
    res = Result(index=run.index, text="", prompt_token_ids=run.request.prompt_token_ids)
    parts = []
    async for out in outputs(run):
        parts.append(out.text)
        res.token_ids += out.token_ids
        if out.logprobs is not None:
            res.logprobs = (res.logprobs or []) + list(out.logprobs)
        if out.prompt_logprobs is not None:
            res.prompt_logprobs = out.prompt_logprobs
        res.finish_reason = out.finish_reason
        res.prompt_tokens, res.completion_tokens = out.prompt_tokens, out.completion_tokens
        res.cached_tokens = out.cached_tokens
    res.text = "".join(parts)
    return res


async def collect_all(engine: Engine, runs: list[Run],
                      is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> list[Result]:
    """Every run to its end. A client that hangs up meanwhile gets its runs aborted (checked every
    DISCONNECT_POLL_S seconds), so an abandoned request does not keep its batch slots."""
    task = asyncio.ensure_future(asyncio.gather(*(collect(r) for r in runs)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return list(task.result())
            if is_disconnected is not None and await is_disconnected():
                raise APIError(499, "the client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
        await close(engine, runs)


async def interleave(runs: list[Run]) -> AsyncIterator[tuple[Run, RequestOutput]]:
    """Outputs of all runs as they come. The caller closes the runs (see `close`)."""
    if len(runs) == 1:
        async for out in outputs(runs[0]):
            yield runs[0], out
        return
    queue: asyncio.Queue[tuple[Run, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(run: Run) -> None:
        try:
            async for out in outputs(run):
                await queue.put((run, out))
        except BaseException as exc:  # surfaced to the consumer, which owns cancellation
            await queue.put((run, exc))
            return
        await queue.put((run, None))

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    try:
        remaining = len(runs)
        while remaining:
            run, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield run, item
    finally:
        for t in tasks:
            t.cancel()


def usage(counts: dict[int, tuple[int, int, int]], n: int):
    """Usage from {choice index: (prompt_tokens, completion_tokens, cached prompt tokens)}; a prompt counts
    once, not per choice, as OpenAI counts it (its cached tokens: those of its first choice)."""
    prompt = sum(c[0] for i, c in counts.items() if i % n == 0)
    cached = sum(c[2] for i, c in counts.items() if i % n == 0)
    completion = sum(c[1] for c in counts.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def stream_error(exc: Exception) -> dict:
    """The event sent when a stream fails after its 200 went out (vLLM sends the same)."""
    if isinstance(exc, GenerationFailed):
        return error_body(500, f"generation failed: {exc}", code="generation_failed")
    return error_body(500, f"generation failed: {type(exc).__name__}: {exc}", code="internal_error")
