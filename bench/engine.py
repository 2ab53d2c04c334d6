"""The engine's KV cache, prefix cache, chunked prefill and dtype, side by side in one run.

    python bench/engine.py            # full sizes (about 6 minutes on the 2-core host)
    python bench/engine.py --quick    # 500-token ITL prompts, 2 rounds, no gather option (about two minutes)

What is measured (SmolLM2-135M-Instruct unless --model; CPU-time figures are this process's, far less
disturbed by other processes than wall time; every A/B pair is interleaved round by round):

* decode: tokens/s of greedy decode steps at batch 32 with 128-token contexts, the paged cache (blocks + the
  decode workspace, server.kv) against the dense-row cache the engine had before it (`DenseRows` below, the
  old decode path verbatim), in one process on the same weights. Also the per-step block gather without the
  workspace, the option the workspace replaced.
* osora: 32 distinct OSoRA r=16 adapters at batch 32 ÷ the base model, paged.
* dtype: bfloat16 ÷ float32 decode (base, batch 32), when the CPU has native bf16 (avx512_bf16 / AMX), and
  the osora ratio again in bfloat16 (what `--dtype auto` serves there).
* ttft: time to first token through the Engine of a request whose 1,000-token system prompt is in the prefix
  cache, against the same request uncached (a fresh system prompt each round).
* itl: inter-token latency of 16 running streams while 4 requests with long prompts (2,000 tokens; 500 with
  --quick) arrive: chunked (--max-num-batched-tokens = each --chunk budget) against unchunked (a budget that
  takes the four prompts whole): the p99 of the streams' gaps while the prompts are prefilled (arrival to
  the last one's first token) against their p50 in the steady decode of the second before, and when the
  long prompts got their first tokens.
* rss: resident memory of `python -m server --max-model-len 32768 --max-batch-size 64` once /health answers,
  with the KV pool it allocated, against what 64 dense rows of 32,768 tokens would take.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, percentile, table, write_results

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The history of computing is a story of layered abstractions. Early machines were programmed by "
        "rewiring panels; later, stored programs let the same hardware run many tasks. Compilers turned "
        "formulas into machine code, operating systems shared one computer among many users, and networks "
        "joined computers into systems that no single person fully understands. ")


def native_bf16() -> bool:
    from server.config import native_bf16 as native

    return native("cpu")


def words(tokenizer, n: int, seed: int) -> list[int]:
    """n token ids of English-like text, different per seed."""
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(TEXT * (n // 40 + 2))
    start = int(torch.randint(0, 40, (1,), generator=g))
    out = ids[start:start + n]
    return [(t + seed) % 30000 + 100 if i % 7 == 3 else t for i, t in enumerate(out)]  # vary the text by seed


# ---- decode: paged against the dense rows of the engine before it --------------------------------------
class DenseRows:
    """The engine's decode before the paged cache: per layer K, V [rows, KV, max_len, hd], rows 0..B-1."""

    def __init__(self, m, rows: int, max_len: int):
        self.m = m
        shape = (len(m.layers), rows, m.n_kv, max_len, m.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=m.dtype), torch.zeros(shape, dtype=m.dtype)

    def decode(self, tokens, pos, batch):
        from server.model import mlp

        m, B, length = self.m, tokens.shape[0], int(pos.max()) + 1
        rows = torch.arange(B)
        cos, sin = m.cos[pos][:, None, None], m.sin[pos][:, None, None]
        visible = torch.arange(length)[None] <= pos[:, None]
        mask = torch.zeros(B, 1, 1, length, dtype=m.dtype)
        mask.masked_fill_(~visible[:, None, None], float("-inf"))
        h = m.embed(tokens[:, None])
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = m.qkv(a, layer.input_layernorm(h), cos, sin, batch)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, kc[:B, :, :length], vc[:B, :, :length], attn_mask=mask,
                                               scale=m.scale, enable_gqa=True)
            h = h + m.out(a, o, batch)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h), batch)
        return m.lm_head(m.norm(h[:, 0])).float()


class Decoder:
    """The engine's model over one adapted model, with contiguous block tables for B rows."""

    def __init__(self, args, dtype: torch.dtype, batch: int, n_slots: int = 33):
        from adapters.runtime import load_adapted_model
        from server.model import DecoderModel
        from server.model_runner import padded_table

        self.adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=n_slots,
                                          dtype=dtype, progress=False)
        self.B, self.ctx, self.steps, bs = batch, args.context, args.steps, 16
        max_len = self.ctx + self.steps + 16
        nb = -(-max_len // bs)
        self.model = DecoderModel(self.adapted.model, batch * nb + 1, bs, max_len)
        self.model.cache.zero(list(range(batch * nb + 1)))
        self.table = padded_table([[1 + b * nb + j for j in range(nb)] for b in range(batch)], self.model.device)
        self.dense = DenseRows(self.model, batch, max_len)
        self.tokens = torch.randint(100, 20000, (batch,), generator=torch.Generator().manual_seed(0))
        self.loaded = 0
        self.keys = list(range(batch))  # the same sequences in every paged run: a running batch's steady state

    def load_osora(self, n: int) -> None:
        from adapters.synthetic import random_adapter

        for slot in range(self.loaded + 1, n + 1):
            self.adapted.load(slot, random_adapter("osora", self.adapted.spec, self.adapted.factors, 16, seed=slot))
        self.loaded = max(self.loaded, n)

    @torch.inference_mode()
    def run(self, how: str, slots: list[int]) -> float:
        """CPU-time tokens/s of `steps` decode steps from position `ctx` (the K/V there are the pool's zeros:
        attention costs the same whatever the values). "paged": the same decode group throughout (the
        workspace is built once, by the warm-up); "gather": the rows' blocks gathered in every step."""
        pos = torch.full((self.B,), self.ctx, dtype=torch.long)
        tok, batch = self.tokens, self.adapted.batch(slots)
        c0 = time.process_time()
        for _ in range(self.steps):
            if how == "dense":
                logits = self.dense.decode(tok, pos, batch)
            else:  # the rows keep their workspace rows (the keys do not change)
                keep = how == "paged" and self.model.workspace.assign(self.keys) is not None
                logits = self.model.decode(tok, pos, self.table, batch, keep)
            tok, pos = logits.argmax(-1), pos + 1
        return self.B * self.steps / (time.process_time() - c0)

    @torch.inference_mode()
    def change_ms(self, rounds: int) -> tuple[float, float]:
        """What a change of the decode group costs (median ms): one sequence leaves and another joins (its
        blocks gathered into the freed row), and a full gather of every row (the workspace grows)."""
        ws, one, every = self.model.workspace, [], []
        for r in range(rounds):
            ws.assign(self.keys)
            ws.prepare(self.table, self.ctx + 1)
            keys = self.keys[:5] + [f"new{r}"] + self.keys[6:]
            t0 = time.perf_counter()
            ws.assign(keys)
            ws.prepare(self.table, self.ctx + 1)
            one.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ws.invalidate()
            ws.prepare(self.table, self.ctx + 1)
            every.append(1000 * (time.perf_counter() - t0))
        ws.invalidate()
        return statistics.median(one), statistics.median(every)


def interleaved(rounds: int, cases: dict[str, callable]) -> dict[str, list[float]]:
    out = {name: [] for name in cases}
    for f in cases.values():
        f()  # warm-up
    for _ in range(rounds):
        for name, f in cases.items():
            out[name].append(f())
    return out


def pair(rows: list[dict], case: str, r: dict[str, list[float]], a: str, b: str, target: str) -> None:
    ratio = statistics.median([x / y for x, y in zip(r[a], r[b])])
    rows.append({"case": case, "a": statistics.median(r[a]), "b": statistics.median(r[b]), "ratio": ratio,
                 "target": target})


def decode_section(args) -> list[dict]:
    rows: list[dict] = []
    d = Decoder(args, torch.float32, 32)
    base = [0] * 32
    cases = {"dense": lambda: d.run("dense", base), "paged": lambda: d.run("paged", base)}
    if not args.quick:
        cases["gather"] = lambda: d.run("gather", base)
    r = interleaved(args.rounds, cases)
    pair(rows, "decode B=32, 128-token contexts: paged ÷ dense rows (before), tok/s", r, "paged", "dense", "≥ 0.95")
    if "gather" in r:
        pair(rows, "  option: block gather + SDPA every step ÷ dense rows", r, "gather", "dense", "–")
    one, every = d.change_ms(5)
    rows.append({"case": "  decode-group change: one sequence swapped ÷ all 32 rows gathered, ms", "a": one,
                 "b": every, "ratio": one / every, "target": "–"})
    osora_rows(args, rows, d, "")
    if native_bf16():
        d16 = Decoder(args, torch.bfloat16, 32)
        r = interleaved(args.rounds, {"bf16": lambda: d16.run("paged", base), "fp32": lambda: d.run("paged", base)})
        pair(rows, "bfloat16 ÷ float32 decode (B=32, base, paged), tok/s", r, "bf16", "fp32", "–")
        osora_rows(args, rows, d16, ", bfloat16")
    return rows


def osora_rows(args, rows: list[dict], d: Decoder, dtype: str) -> None:
    """32 distinct OSoRA adapters ÷ the base model, served as the server serves them (the native CPU kernel
    where it builds) and, in the same rounds, with the torch composition (`--cpu-kernels off`)."""
    d.load_osora(32)
    mixed, base = [1 + i for i in range(32)], [0] * 32
    kernel = d.adapted.kernels

    def served(on: bool) -> float:
        d.adapted.use_kernels(on)
        return d.run("paged", mixed)

    cases = {"osora": lambda: served(True), "base": lambda: d.run("paged", base)}
    if kernel.startswith("cpu kernel"):
        cases["torch"] = lambda: served(False)
    r = interleaved(args.rounds, cases)
    d.adapted.use_kernels(True)
    pair(rows, f"OSoRA r=16, 32 distinct ÷ base{dtype} (B=32, paged; {kernel}), tok/s", r, "osora", "base", "≥ 0.95")
    if "torch" in r:
        pair(rows, f"  OSoRA with --cpu-kernels off ÷ base{dtype}", r, "torch", "base", "–")


# ---- engine-level: TTFT with the prefix cache, ITL with chunked prefill ------------------------------
def make_engine(adapted, store_dir: str, **config):
    from server.config import EngineConfig
    from server.engine import Engine
    from server.store import AdapterStore

    cfg = EngineConfig(**({"max_batch_size": 32, "max_model_len": 4096, "max_queue": 64,
                           "max_resident_adapters": 4, "merge_policy": "never"} | config))
    engine = Engine(cfg, adapted, adapted.base.tokenizer, AdapterStore(store_dir, adapted.spec))
    engine.start()
    return engine


async def first_token(engine, prompt: list[int]) -> float:
    from server.engine import GenerationRequest, SamplingParams

    req = GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    async for _ in engine.generate(req):
        break
    return time.perf_counter() - t0


def ttft_section(args, adapted, store_dir: str) -> list[dict]:
    engine = make_engine(adapted, store_dir)
    tok = adapted.base.tokenizer
    cold, warm = [], []

    async def rounds():
        await first_token(engine, words(tok, 64, 999))  # warm-up
        for r in range(args.rounds):
            system = words(tok, 1000, 100 + r)  # new each round: the first request cannot hit
            cold.append(await first_token(engine, system + words(tok, 20, 200 + r)))
            warm.append(await first_token(engine, system + words(tok, 20, 300 + r)))

    try:
        asyncio.run(rounds())
    finally:
        engine.shutdown()
    c, w = statistics.median(cold), statistics.median(warm)
    return [{"case": "TTFT, 1,000-token system prompt: uncached ÷ cached, ms", "a": 1000 * c, "b": 1000 * w,
             "ratio": c / w, "target": "≥ 5"}]


async def itl_run(engine, tok, long_len: int) -> tuple[list[float], list[float], float]:
    """16 streams decode; 3 s later 4 long prompts arrive. Returns the streams' inter-token gaps of steady
    decode (the second before the arrivals), their gaps that overlap the long prompts' prefill (from the
    arrivals to the last long prompt's first token), and that window (s)."""
    from server.engine import GenerationRequest, SamplingParams

    marks: dict[int, list[float]] = {i: [] for i in range(16)}
    window = [0.0, 0.0]

    async def stream(i: int):
        req = GenerationRequest(f"s{i}-{uuid.uuid4().hex}", words(tok, 32, 400 + i),
                                SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True))
        async for _ in engine.generate(req):
            now = time.perf_counter()
            marks[i].append(now)
            if window[1] and now > window[1] + 0.5:
                break

    async def arrivals():
        await asyncio.sleep(3.0)  # the streams are decoding
        window[0] = time.perf_counter()
        firsts = await asyncio.gather(*(first_token(engine, words(tok, long_len, 500 + j)) for j in range(4)))
        window[1] = window[0] + max(firsts)

    await asyncio.gather(arrivals(), *(stream(i) for i in range(16)))
    gaps = [(a, b - a) for m in marks.values() for a, b in zip(m, m[1:])]
    steady = [g for a, g in gaps if window[0] - 1.0 <= a and a + g <= window[0]]
    during = [g for a, g in gaps if a < window[1] and a + g > window[0]]  # overlapping the prefill
    return steady, during, window[1] - window[0]


def itl_section(args, adapted, store_dir: str) -> list[dict]:
    """Per --max-num-batched-tokens budget: the streams' p99 gap while the long prompts are prefilled against
    their median gap in steady decode (how long a prompt chunk stops them), and when the long prompts got
    their first tokens (what chunking costs them)."""
    tok, rows = adapted.base.tokenizer, []
    budgets = [(f"{b} tokens/step", int(b)) for b in str(args.chunk).split(",")]
    for label, budget in budgets + [("unchunked", 4 * args.long + 64)]:
        engine = make_engine(adapted, store_dir, max_num_batched_tokens=budget, prefix_caching=False)
        try:
            steady, during, span = asyncio.run(itl_run(engine, tok, args.long))
        finally:
            engine.shutdown()
        p50, p99 = percentile(steady, 50), percentile(during, 99)
        rows.append({"case": f"ITL of 16 streams while 4 × {args.long}-token prompts arrive, {label}: p99 during "
                             f"their prefill ÷ steady p50, ms (their last first token after {span:.1f} s)",
                     "a": 1000 * p99, "b": 1000 * p50, "ratio": p99 / p50, "target": "≤ 2 (chunked)",
                     "budget": budget, "window_s": span, "during_p50_ms": 1000 * percentile(during, 50)})
    return rows


# ---- RSS at start ---------------------------------------------------------------------------------------
def rss_section(args) -> list[dict]:
    import httpx

    port = 18000 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "server", "--port", str(port), "--store", tmp, "--max-model-len", "32768",
               "--max-batch-size", "64", "--kv-cache-memory", args.kv_memory, "--dtype", "float32",
               "--log-level", "warning"] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    stats = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None:
                        raise RuntimeError(proc.stderr.read().decode()[-2000:]) from None
                    time.sleep(0.5)
            rss = int(next(l for l in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if l.startswith("VmRSS")).split()[1]) * 1024
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    blocks = int(float(next(l.split()[-1] for l in stats.splitlines() if "kv_blocks_total" in l and not l.startswith("#"))))
    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M, float32: layers × (K, V) × KV heads × head_dim × bytes
    return [{"case": f"RSS at start, --max-model-len 32768 --max-batch-size 64 --kv-cache-memory {args.kv_memory}: ÷ 64 dense rows, MiB",
             "a": rss / 2**20, "b": 64 * 32768 * per_token / 2**20, "ratio": rss / (64 * 32768 * per_token),
             "target": "the budget, not 64 rows", "kv_pool_mib": blocks * 16 * per_token / 2**20}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller ITL prompts, fewer rounds (under two minutes)")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "factors"), help="SVD factor cache directory")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per A/B pair (default 5; quick 3)")
    p.add_argument("--context", type=int, default=128, help="decode context length")
    p.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--long", type=int, default=None, help="ITL: long prompt tokens (default 2000; quick 1000)")
    p.add_argument("--chunk", default=None, help="ITL: --max-num-batched-tokens budgets of the chunked runs, "
                                                  "comma-separated (default 64,128,256; quick 128)")
    p.add_argument("--kv-memory", default="2GiB", help="RSS: --kv-cache-memory of the started server")
    p.add_argument("--only", default="decode,ttft,itl,rss", help="sections to run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="ttft, itl: the engine's dtype (auto: as the server picks it on this machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.long = args.long or (500 if args.quick else 2000)
    args.chunk = args.chunk or ("128" if args.quick else "64,128,256")
    if args.quick:
        args.steps = min(args.steps, 6)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    only = set(args.only.split(","))
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "decode" in only:
        rows += decode_section(args)
    if only & {"ttft", "itl"}:
        from adapters.runtime import load_adapted_model

        from server.config import resolve_dtype

        dtype = getattr(torch, resolve_dtype(args.dtype, "cpu"))
        adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=5, dtype=dtype,
                                     progress=False)
        with tempfile.TemporaryDirectory() as store:
            if "ttft" in only:
                rows += ttft_section(args, adapted, store)
            if "itl" in only:
                rows += itl_section(args, adapted, store)
    if "rss" in only:
        rows += rss_section(args)
    print(table(rows, ["case", "a", "b", "ratio", "target"], {"ratio": 2}))
    print(f"\n(a, b: tokens/s of CPU time, ms or MiB as each row says; {time.perf_counter() - t0:.0f} s)")
    write_results("engine_quick" if args.quick else "engine", {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
