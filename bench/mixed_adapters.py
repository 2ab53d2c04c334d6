"""Engine-level decode throughput with many distinct adapters in one running batch, against the bare base
model on the same engine and against PEFT's own mixed-batch generate.

    python bench/mixed_adapters.py            # full matrix (about 10 minutes on the 2-core AMD EPYC Zen 4 host)
    python bench/mixed_adapters.py --quick    # OSoRA at 32 adapters, PEFT at 32 (about 1.5 min there)

What is timed: the decode step of the engine's model (`server.model.DecoderModel.decode`, the forward the
engine's runner calls every step, with the per-row `AdapterBatch`) plus a greedy argmax, at batch B, after
a prefill that is not timed. Rows cycle over n distinct adapters (row i uses adapter i mod n). Every
configuration is measured `--rounds` times, interleaved with the base model (slot 0 for every row) on the
same engine: each measurement sits between two base measurements and is divided by their mean, so load
from other processes and drifts in the machine's speed cancel out as far as possible. The reported figure
is the median over rounds.

PEFT: the same base model wrapped by PEFT with LoRA r=16 adapters, `generate(adapter_names=[...])` on the
same prompts, against plain transformers `generate` of the same base model; its decode steps are timed from
inside generate (bench/peft_baseline.py), so both sides exclude the prefill. Each transformers `generate`
measurement also sits between two measurements of svdserve's base model (row `svdserve base ÷ transformers
generate`): the engine against transformers, interleaved.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass

import torch

from common import machine, table, write_results

DEFAULT_CONFIGS = "osora:16,osora:64,loraxs:16,vera:16,lora:16"
PROMPT_TEXT = (
    "The history of computing is a story of layered abstractions. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run many tasks. Compilers turned "
    "formulas into machine code, operating systems shared one computer among many users, and networks "
    "joined computers into systems that no single person fully understands. Each layer hides the one "
    "below it, and each brings its own costs: memory, latency, energy, and the effort of people who "
    "must keep it all working. Serving language models to many tenants is the newest such layer."
)


@dataclass(frozen=True)
class Case:
    method: str | None  # None = the base model
    rank: int
    distinct: int  # distinct adapters in the batch (0 = base)
    batch: int
    merged: bool = False

    @property
    def label(self) -> str:
        if self.method is None:
            return f"base (B={self.batch})"
        how = "merged" if self.merged else f"{self.distinct} distinct"
        return f"{self.method} r={self.rank}, {how} (B={self.batch})"


def make_prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """`batch` different prompts of exactly `length` tokens: windows of one text at different offsets."""
    ids = tokenizer.encode(PROMPT_TEXT * 4)
    step = max(1, (len(ids) - length) // max(1, batch))
    return torch.tensor([ids[i * step: i * step + length] for i in range(batch)], dtype=torch.long)


def parse_configs(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        method, _, rank = item.strip().partition(":")
        out.append((method, int(rank or 16)))
    return out


# ---- svdserve --------------------------------------------------------------------------------------
class Bench:
    """The engine's model (DecoderModel over an AdaptedModel) and the adapters loaded into its slots."""

    def __init__(self, args: argparse.Namespace, max_batch: int, n_slots: int):
        from adapters.runtime import load_adapted_model
        from server.model import DecoderModel

        dtype = getattr(torch, args.dtype)
        self.adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=n_slots,
                                          dtype=dtype, progress=False)
        self.tokenizer = self.adapted.base.tokenizer
        self.max_len = args.prompt_len + args.steps + args.warmup + 2
        from server.model import padded_table

        bs = 16
        nb = -(-self.max_len // bs)
        self.model = DecoderModel(self.adapted.model, max_batch * nb + 1, bs, self.max_len)
        self.model.cache.zero(list(range(max_batch * nb + 1)))
        # row b owns blocks 1 + b*nb ..: what the engine's block manager hands out to a batch admitted at once
        self.block_lists = [[1 + b * nb + j for j in range(nb)] for b in range(max_batch)]
        self.tables = padded_table(self.block_lists, self.model.device)
        self.loaded: tuple[str, int, int] | None = None

    def load(self, method: str, rank: int, n: int) -> float:
        """Random adapters of `method` into slots 1..n (the same seeds every time); returns seconds."""
        from adapters.synthetic import random_adapter

        if self.loaded == (method, rank, n):
            return 0.0
        t0 = time.perf_counter()
        for slot in range(1, n + 1):
            a = random_adapter(method, self.adapted.spec, self.adapted.factors, rank, seed=1000 + slot)
            self.adapted.load(slot, a)
        self.loaded = (method, rank, n)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, prompts: torch.Tensor, case: Case, steps: int, warmup: int) -> tuple[float, float]:
        """Prefill (untimed), then time `steps` greedy decode steps. Returns tokens per second of wall time
        and per second of this process's CPU time (the latter is far less disturbed by other processes)."""
        B, P = prompts.shape[0], prompts.shape[1]
        if case.merged:
            self.adapted.merge(self.adapted.resident[1])
            slots = [1] * B
        else:
            slots = [0] * B if case.distinct == 0 else [1 + i % case.distinct for i in range(B)]
        try:
            # prefill: the prompts' tokens are the rows, back to back, each with its sequence's slot
            table = self.tables[:B]
            logits = self.model.prefill(prompts.tolist(), [0] * B, self.block_lists[:B],
                                        self.adapted.batch([s for s in slots for _ in range(P)]))
            tok = logits.argmax(-1)
            pos = torch.full((B,), P, dtype=torch.long)
            t0 = c0 = 0.0
            for i in range(warmup + steps):
                if i == warmup:
                    t0, c0 = time.perf_counter(), time.process_time()
                batch = self.adapted.batch(slots)  # built every step, as the engine's runner does
                # the same sequences every step: they keep their decode-workspace rows, as in the engine
                keep = self.model.workspace.assign(list(range(B))) is not None
                tok = self.model.decode(tok, pos, table, batch, keep).argmax(-1)
                pos = pos + 1
            return B * steps / (time.perf_counter() - t0), B * steps / (time.process_time() - c0)
        finally:
            self.adapted.unmerge()


def svdserve_cases(configs: list[tuple[str, int]], counts: list[int], batch: int, big: int | None,
                   big_configs: list[tuple[str, int]]) -> list[list[Case]]:
    """Groups of cases that share one set of loaded adapters; each group is measured next to the base."""
    groups = []
    for method, rank in configs:
        g = [Case(method, rank, n, batch) for n in counts if n <= batch]
        g.append(Case(method, rank, 1, batch, merged=True))
        if big and (method, rank) in big_configs:
            g.append(Case(method, rank, big, big))
        groups.append(g)
    return groups


def run_svdserve(args, prompts: dict[int, torch.Tensor], groups: list[list[Case]]) -> tuple[list[dict], Bench]:
    max_batch = max(p.shape[0] for p in prompts.values())
    max_n = max(c.distinct for g in groups for c in g)
    bench = Bench(args, max_batch, n_slots=max_n + 1)
    samples: dict[Case, list[tuple]] = {}  # case -> [((tok/s, cpu tok/s), (base tok/s, base cpu tok/s))]
    # An untimed pass over every case first: the first decode at a batch size or of a method is many times
    # slower (first touch of the KV cache and banks, kernel selection) and would poison round 1's ratios.
    for group in groups:
        c0 = group[0]
        bench.load(c0.method, c0.rank, max(c.distinct for c in group))
        for case in [Case(None, 0, 0, b) for b in sorted({c.batch for c in group})] + group:
            bench.decode(prompts[case.batch], case, 2, 1)
    for rnd in range(args.rounds):
        for group in groups:
            c0 = group[0]
            seconds = bench.load(c0.method, c0.rank, max(c.distinct for c in group))
            print(f"round {rnd + 1}: {c0.method} r={c0.rank} loaded in {seconds:.1f} s", flush=True)
            # base, case, base, case, ..., base: each case is divided by the mean of the base measurements
            # just before and just after it, so a drift in machine speed during the round cancels out
            base = {b: bench.decode(prompts[b], Case(None, 0, 0, b), args.steps, args.warmup)
                    for b in sorted({c.batch for c in group})}
            for b, v in base.items():
                samples.setdefault(Case(None, 0, 0, b), []).append((v, v))
            for case in group:
                v = bench.decode(prompts[case.batch], case, args.steps, args.warmup)
                after = bench.decode(prompts[case.batch], Case(None, 0, 0, case.batch), args.steps, args.warmup)
                samples[Case(None, 0, 0, case.batch)].append((after, after))
                b = mean_pair(base[case.batch], after)
                base[case.batch] = after
                samples.setdefault(case, []).append((v, b))
                print(f"  {case.label:45s} {v[0]:8.1f} tok/s  ({v[0] / b[0]:.2f}× base; CPU time "
                      f"{v[1] / b[1]:.2f}×)", flush=True)
            gc.collect()
    return [summarise(case, s) for case, s in samples.items()], bench


def summarise(case: Case, s: list[tuple]) -> dict:
    return {"engine": "svdserve", "config": case.label, "method": case.method or "base", "rank": case.rank,
            "distinct": case.distinct, "batch": case.batch, "merged": case.merged, **medians(s)}


def medians(s: list[tuple]) -> dict:
    """Result columns from per-round ((tok/s, CPU tok/s), (its base's tok/s, CPU tok/s)) pairs."""
    return {"tok_s": statistics.median(v[0] for v, _ in s), "base_tok_s": statistics.median(b[0] for _, b in s),
            "ratio": statistics.median(v[0] / b[0] for v, b in s),
            "cpu_ratio": statistics.median(v[1] / b[1] for v, b in s), "rounds": [v[0] for v, _ in s]}


def mean_pair(a: tuple, b: tuple) -> tuple:
    """The mean of two (tok/s, CPU tok/s) measurements."""
    return tuple((x + y) / 2 for x, y in zip(a, b))


# ---- PEFT ------------------------------------------------------------------------------------------
def run_peft(args, prompts: torch.Tensor, counts: list[int], engine: Bench | None = None) -> list[dict]:
    """PEFT's mixed batch against transformers' generate; with `engine`, also svdserve's base model against
    transformers' generate, interleaved (engine, transformers, engine in every round)."""
    from peft_baseline import PeftBaseline

    B = prompts.shape[0]
    counts = [n for n in counts if n <= B]
    pb = PeftBaseline(args.model, max(counts), rank=16, dtype=getattr(torch, args.dtype))
    samples: dict[int, list[tuple]] = {}
    pb.decode_plain(prompts, 2)  # untimed warm-up, as for svdserve
    pb.decode(prompts, 2, max(counts))
    vs: list[tuple] = []  # (svdserve engine base, transformers generate) per round
    base_case = Case(None, 0, 0, B)
    for rnd in range(args.rounds):
        e0 = engine.decode(prompts, base_case, args.steps, args.warmup) if engine else None
        base = _tok_s(B, pb.decode_plain(prompts, args.peft_steps))
        samples.setdefault(0, []).append((base, base))
        print(f"round {rnd + 1}: transformers generate (base, B={B}) {base[0]:8.1f} tok/s", flush=True)
        if engine:
            e1 = engine.decode(prompts, base_case, args.steps, args.warmup)
            e = mean_pair(e0, e1)
            vs.append((e, base))
            print(f"  svdserve engine base (B={B}) {e[0]:8.1f} tok/s around it ({e[0] / base[0]:.2f}× transformers "
                  f"generate; CPU time {e[1] / base[1]:.2f}×)", flush=True)
        for n in counts:
            v = _tok_s(B, pb.decode(prompts, args.peft_steps, n))
            samples.setdefault(n, []).append((v, base))
            print(f"  PEFT LoRA r=16, {n} distinct (B={B}) {v[0]:8.1f} tok/s  ({v[0] / base[0]:.2f}× base; "
                  f"CPU time {v[1] / base[1]:.2f}×)", flush=True)
    rows = []
    for n, s in samples.items():
        label = f"transformers generate, base (B={B})" if n == 0 else f"PEFT LoRA r=16, {n} distinct (B={B})"
        rows.append({"engine": "peft" if n else "transformers", "config": label, "method": "lora" if n else "base",
                     "rank": 16 if n else 0, "distinct": n, "batch": B, "merged": False, **medians(s)})
    if vs:  # × base here: the svdserve engine's base model ÷ transformers' generate measured between its two runs
        rows.append({"engine": "svdserve-vs-transformers", "config": f"svdserve base ÷ transformers generate (B={B})",
                     "method": "base", "rank": 0, "distinct": 0, "batch": B, "merged": False, **medians(vs)})
    return rows


def _tok_s(batch: int, steps_seconds: tuple[int, float, float]) -> tuple[float, float]:
    steps, wall, cpu = steps_seconds
    return batch * steps / wall, batch * steps / cpu


# ---- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small matrix in under two minutes")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--cache-dir", default=None, help="SVD factor cache directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--counts", default="1,8,32", help="distinct adapters in the batch")
    p.add_argument("--big", type=int, default=128, help="also run this many distinct adapters at batch = that (0: off)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="method:rank,... measured unmerged and merged")
    p.add_argument("--big-configs", default="osora:16,loraxs:16,vera:16", help="the configs also run at --big")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peft-steps", type=int, default=12)
    p.add_argument("--peft-counts", default="1,8,32")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--name", default=None, help="results file name (default: mixed_adapters[_quick])")
    p.add_argument("--plot", default=None, help="also draw the throughput plot to this PNG")
    args = p.parse_args(argv)
    if args.quick:  # OSoRA at 32 distinct adapters against the base model, PEFT at 32: the headline ratios
        args.configs, args.counts, args.big, args.prompt_len = "osora:16", "32", 0, 16
        args.steps, args.warmup, args.rounds, args.peft_steps, args.peft_counts = 6, 1, 1, 3, "32"
    args.name = args.name or ("mixed_adapters_quick" if args.quick else "mixed_adapters")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    counts = [int(n) for n in args.counts.split(",")]
    groups = svdserve_cases(parse_configs(args.configs), counts, args.batch, args.big or None,
                            parse_configs(args.big_configs))
    tok = _tokenizer(args.model)
    prompts = {b: make_prompts(tok, b, args.prompt_len) for b in {args.batch} | ({args.big} if args.big else set())}
    rows, bench = run_svdserve(args, prompts, groups)
    if not args.no_peft:
        rows += run_peft(args, prompts[args.batch], [int(n) for n in args.peft_counts.split(",")], bench)
    print()
    print(table(rows, ["config", "tok_s", "ratio", "cpu_ratio"], {"ratio": 2, "cpu_ratio": 2}))
    write_results(args.name, {"dtype": args.dtype, "steps": args.steps, "rounds": args.rounds,
                              "prompt_len": args.prompt_len, "seconds": time.perf_counter() - t_start,
                              "rows": rows})
    if args.plot:
        from plot import throughput_plot

        throughput_plot(rows, args.plot, machine())


def _tokenizer(path: str | None):
    import os

    from transformers import AutoTokenizer

    from adapters.base_model import default_model_path

    path = path or default_model_path()
    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


if __name__ == "__main__":
    main()
