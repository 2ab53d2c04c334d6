"""Building a tiny engine and running requests through it (shared by the engine and residency tests)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from server.config import EngineConfig
from server.engine import Engine, GenerationRequest, RequestOutput, SamplingParams
from server.store import AdapterStore

CONFIG = EngineConfig(max_batch_size=8, max_model_len=64, max_queue=32, max_resident_adapters=7,
                      merge_policy="never")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def make_engine(adapted, tokenizer, store_dir, **config) -> tuple[Engine, AdapterStore]:
    store = AdapterStore(str(store_dir), adapted.spec)
    return Engine(replace(CONFIG, **config), adapted, tokenizer, store, seed=0), store


def request(i: int, prompt: list[int], adapter_id: str | None = None, params: SamplingParams = GREEDY,
            ) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=adapter_id)


async def collect(engine: Engine, req: GenerationRequest) -> list[RequestOutput]:
    return [out async for out in engine.generate(req)]


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> list[list[RequestOutput]]:
    """Submit every request at once (one event loop) and wait for all of them."""
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))
    return asyncio.run(main())


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)
