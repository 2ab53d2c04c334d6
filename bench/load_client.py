"""The load generator of bench/serve_load.py: N concurrent streaming clients against any OpenAI-style
`/v1/completions` endpoint (svdserve, llama.cpp's llama-server, transformers serve).

Every client sends its requests one after another (a closed loop, as a chat user would), each request
streaming `max_tokens` greedy tokens with end-of-sequence ignored (each server's own way of saying so goes
in `body`), so every server does the same work.
Per request it records the time to first token and the gaps between streamed tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from common import percentile


@dataclass
class RequestTrace:
    ok: bool
    ttft: float | None = None  # seconds from sending to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    tokens: int = 0
    error: str | None = None


@dataclass
class LoadSpec:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    clients: int
    requests_per_client: int
    max_tokens: int
    prompts: list[str]
    body: Callable[[int], dict]  # request index -> extra body fields (adapter selection, ignore_eos, ...)
    timeout: float = 600.0


async def _one(client: httpx.AsyncClient, spec: LoadSpec, i: int) -> RequestTrace:
    body = {"prompt": spec.prompts[i % len(spec.prompts)], "max_tokens": spec.max_tokens, "temperature": 0,
            "stream": True, **spec.body(i)}
    trace, last, t0, usage = RequestTrace(ok=False), None, time.perf_counter(), None
    try:
        async with client.stream("POST", spec.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                trace.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return trace
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
                n = _tokens_in(chunk)
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    trace.ttft = now - t0
                else:
                    trace.gaps.extend([(now - last) / n] * n)
                last, trace.tokens = now, trace.tokens + n
        trace.tokens = max(trace.tokens, usage or 0)  # a token with no text of its own still counts
        trace.ok = trace.tokens > 0
        if not trace.ok:
            trace.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


def _tokens_in(chunk: dict) -> int:
    """Tokens carried by one streamed chunk: one per chunk with text (every server here streams one token
    per chunk; svdserve may batch several when a step yields them, reported via token_ids)."""
    if "error" in chunk:
        raise json.JSONDecodeError(f"error chunk: {chunk['error']}", "", 0)
    n = 0
    for c in chunk.get("choices") or []:
        ids = c.get("token_ids")
        n += len(ids) if ids else (1 if c.get("text") else 0)
    return n


async def run_load(spec: LoadSpec) -> dict:
    """Run the load; returns throughput, TTFT and inter-token latency percentiles, and errors."""
    limits = httpx.Limits(max_connections=spec.clients + 4, max_keepalive_connections=spec.clients + 4)
    async with httpx.AsyncClient(timeout=spec.timeout, limits=limits) as client:
        async def worker(c: int) -> list[RequestTrace]:
            return [await _one(client, spec, c * spec.requests_per_client + j) for j in range(spec.requests_per_client)]

        t0 = time.perf_counter()
        traces = [t for ts in await asyncio.gather(*(worker(c) for c in range(spec.clients))) for t in ts]
        wall = time.perf_counter() - t0
    ok = [t for t in traces if t.ok]
    gaps = [g for t in ok for g in t.gaps]
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    errors = [t.error for t in traces if not t.ok]
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {"requests": len(traces), "errors": len(errors), "error_examples": errors[:3],
            "tokens": sum(t.tokens for t in ok), "seconds": wall,
            "tok_s": sum(t.tokens for t in ok) / wall,
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99))}
