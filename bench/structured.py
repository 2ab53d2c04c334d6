"""Structured output's cost: decode throughput at batch 32 with 0%, 50% and 100% of the rows constrained to a
JSON schema (xgrammar masks), interleaved rounds on the default model, and grammar compile time (cold and cached).

Two schema sets: `long` (arrays of at least 16 objects: no row can finish within --tokens, so the batch stays
at 32 for every step and the ratio is the per-step cost of the constraint) and `typical` (three small
schemas: constrained rows end when their JSON is complete, so later steps run a smaller batch).

    python bench/structured.py [--rounds 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import torch

from common import table, write_results

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                      "city": {"type": "string"}}, "required": ["name", "age", "city"]},
    {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {
        "type": "string"}}, "rating": {"enum": ["good", "bad", "ok"]}}, "required": ["title", "tags", "rating"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
]

LONG = [{"type": "object", "properties": {"rows": {"type": "array", "minItems": 16, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string"},
                                     "kind": {"enum": ["a", "b", "c"]}}, "required": ["id", "label", "kind"]}}},
    "required": ["rows"]},
    {"type": "object", "properties": {"words": {"type": "array", "minItems": 40, "items": {"type": "string"}}},
     "required": ["words"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 12, "items": {
        "type": "array", "minItems": 3, "items": {"type": "number"}}}}, "required": ["matrix"]}]
SETS = {"long": LONG, "typical": SCHEMAS}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48, help="tokens per request (min_tokens = max_tokens for free rows)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--name", default="structured")
    return p.parse_args()


def build(args):
    from adapters.runtime import load_adapted_model
    from server.config import EngineConfig
    from server.engine import Engine
    from server.store import AdapterStore

    adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=2, device="cpu",
                                 dtype=torch.float32, progress=False)
    tok = adapted.base.tokenizer
    store = AdapterStore(tempfile.mkdtemp(prefix="svdserve-bench-"), adapted.spec)
    cfg = EngineConfig(max_batch_size=args.batch, max_model_len=512, max_queue=4 * args.batch,
                       max_resident_adapters=1, merge_policy="never")
    engine = Engine(cfg, adapted, tok, store, seed=0)
    engine.start()
    return engine, tok


def compile_times(engine) -> list[dict]:
    from server.grammar import GrammarSpec

    rows = []
    for i, schema in enumerate(SCHEMAS):
        spec = GrammarSpec.json_schema(schema)
        t0 = time.perf_counter()
        engine.grammars.compile(spec)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.grammars.compile(spec)
        rows.append({"schema": f"schema {i + 1}", "cold ms": 1000 * cold, "cached ms": 1000 * (time.perf_counter() - t0)})
    return rows


async def one_round(engine, tok, frac: float, args, round_no: int, schemas: list[dict]) -> tuple[float, int]:
    from server.engine import GenerationRequest, SamplingParams
    from server.grammar import GrammarSpec

    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a thing as JSON."}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    n_constrained = round(frac * args.batch)
    reqs = []
    for i in range(args.batch):
        if i < n_constrained:
            g = engine.grammars.compile(GrammarSpec.json_schema(schemas[i % 3]))
            p = SamplingParams(max_tokens=args.tokens, temperature=0.7, seed=i, grammar=g)
        else:
            p = SamplingParams(max_tokens=args.tokens, temperature=0.7, seed=i, ignore_eos=True)
        reqs.append(GenerationRequest(request_id=f"b{round_no}-{frac}-{i}", prompt_token_ids=prompt, params=p))

    async def run(r):
        n = 0
        async for out in engine.generate(r):
            n += len(out.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(run(r) for r in reqs))
    return time.perf_counter() - t0, sum(counts)


def main() -> None:
    args = parse_args()
    engine, tok = build(args)
    compiles = compile_times(engine)
    cells = [("free", 0.0)] + [(name, f) for name in SETS for f in (0.5, 1.0)]
    per: dict[tuple, list[float]] = {c: [] for c in cells}
    tokens: dict[tuple, list[int]] = {c: [] for c in cells}
    asyncio.run(one_round(engine, tok, 0.0, args, -1, LONG))  # warm-up
    for r in range(args.rounds):
        for c in cells:  # interleaved: every round measures every cell
            dt, n = asyncio.run(one_round(engine, tok, c[1], args, r, SETS.get(c[0], LONG)))
            per[c].append(n / dt)
            tokens[c].append(n)
    engine.shutdown()
    base = statistics.median(per[cells[0]])
    rows = [{"schemas": name, "constrained": f"{int(f * 100)}%", "tok/s": statistics.median(per[(name, f)]),
             "× unconstrained": statistics.median(per[(name, f)]) / base,
             "tokens/round": statistics.median(tokens[(name, f)]),
             "rounds tok/s": ", ".join(f"{v:.0f}" for v in per[(name, f)])} for name, f in cells]
    print(table(rows, ["schemas", "constrained", "tok/s", "× unconstrained", "tokens/round", "rounds tok/s"],
                {"× unconstrained": 2}))
    print(table(compiles, ["schema", "cold ms", "cached ms"], {"cold ms": 1, "cached ms": 3}))
    write_results(args.name, {"batch": args.batch, "tokens": args.tokens, "rows": rows, "compile": compiles})


if __name__ == "__main__":
    main()
