"""Profile the engine's decode step with torch.profiler: the base model against a batch of distinct
adapters, so the adapter path's own operators stand out.

    python bench/profile_mixed.py [--method osora --rank 16 --distinct 32 --batch 32 --steps 8]

Prints, for both, the operators sorted by self CPU time, and the number of operator calls per step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mixed_adapters import Bench, Case, _tokenizer, make_prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--method", default="osora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distinct", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=18, help="operators shown")
    args = p.parse_args(argv)
    args.prompt_len, args.warmup = 32, 2
    bench = Bench(args, args.batch, n_slots=args.distinct + 1)
    bench.load(args.method, args.rank, args.distinct)
    prompts = make_prompts(_tokenizer(args.model), args.batch, args.prompt_len)
    for case in (Case(None, 0, 0, args.batch), Case(args.method, args.rank, args.distinct, args.batch)):
        bench.decode(prompts, case, 2, 1)  # warm up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tok_s, _ = bench.decode(prompts, case, args.steps, 0)
        events = prof.key_averages()
        calls = sum(e.count for e in events if not e.key.startswith("Profiler"))
        print(f"\n=== {case.label}: {tok_s:.1f} tok/s under the profiler, "
              f"{calls / (args.steps + 1):.0f} operator calls per step (prefill included once)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
