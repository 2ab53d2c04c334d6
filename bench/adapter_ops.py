"""The cost of adapter operations: upload (store put: parse, validate, atomic write), cold load (store →
resident → first token, through the engine), eviction, merge and restore, bytes per adapter on disk and
resident, how many adapters fit resident in a given memory, and cold loads under load: the TTFT of requests
naming one of 1,000 adapters cycling through 64 slots while other streams decode, against requests on resident
adapters, and those streams' inter-token latency meanwhile.

    python bench/adapter_ops.py              # OSoRA, LoRA-XS, VeRA, LoRA, SORSA at r=16 and r=64
    python bench/adapter_ops.py --quick      # r=16 only, fewer repetitions (< 2 min)

HTTP upload latency (the same store put behind PUT /adapters/{id}) is reported by bench/serve_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
import uuid

import torch

from common import percentile, table, write_results

METHODS = ["osora", "loraxs", "vera", "lora", "sorsa"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-gb", type=float, default=1.0, help="device memory set aside for resident adapters")
    p.add_argument("--streams", type=int, default=16, help="cold loads under load: long streams decoding")
    p.add_argument("--arrivals", type=int, default=4, help="cold loads under load: clients sending short requests")
    p.add_argument("--cycle-adapters", type=int, default=1000, help="cold loads under load: stored adapters cycled")
    p.add_argument("--slots", type=int, default=64, help="cold loads under load: resident adapter slots")
    p.add_argument("--long-tokens", type=int, default=32, help="tokens per long-stream request")
    p.add_argument("--phase-seconds", type=float, default=30.0, help="length of the warm and of the cold phase")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.repeats, args.phase_seconds = "16", 2, 12.0
    args.name = args.name or ("adapter_ops_quick" if args.quick else "adapter_ops")
    return args


def med_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def resident_bytes(adapted, method: str, slot: int) -> int:
    """Device bytes one resident adapter of `method` occupies in `slot`, summed over the layers' banks
    (shared state such as VeRA's projections, paid once per projection, is not counted)."""
    banks = [layer.banks[method] for layer in adapted.layers.values() if method in layer.banks]
    return sum(_slot_bytes(bank, slot, adapted.n_slots) for bank in banks)


def _slot_bytes(bank, slot: int, n_slots: int) -> int:
    held = getattr(bank, "slots", None)
    if isinstance(held, dict):  # grouped banks (LoRA, SORSA) hold each adapter's own tensors
        return sum(t.numel() * t.element_size() for t in _tensors(held.get(slot)))
    # stacked banks: every slot costs the same, its row of each [n_slots, ...] tensor. Counted by the row,
    # not by the storage: OSoRA's banks are views into one model-wide slot table (adapters/fused.py), whose
    # storage every layer shares.
    return sum(t[slot].numel() * t.element_size() for t in vars(bank).values()
               if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n_slots)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def method_row(adapted, store, method: str, rank: int, args) -> dict:
    """Store put/get, load into a slot (layer by layer; and prepared off the engine thread, then loaded from
    the image), unload (eviction), merge and restore for one method and rank."""
    from adapters.synthetic import random_adapter

    a = random_adapter(method, adapted.spec, adapted.factors, rank, seed=7)
    data = a.to_bytes()
    aid = f"{method}-r{rank}"
    put_ms = med_ms(lambda: store.put(aid, data), args.repeats)
    get_ms = med_ms(lambda: store.get(aid), args.repeats)
    stored = store.get(aid).adapter
    load_ms = med_ms(lambda: adapted.load(1, stored), args.repeats)
    prepare_ms = med_ms(lambda: adapted.prepare(stored), args.repeats)  # in the route's worker thread
    image = adapted.prepare(stored)
    load_image_ms = med_ms(lambda: adapted.load(1, image), args.repeats)  # what the engine thread does then
    res = resident_bytes(adapted, method, 1)
    unload_ms = unload_only_ms(adapted, stored, args.repeats)
    pristine = {n: l.weight.detach().clone() for n, l in list(adapted.layers.items())[:3]}
    merge_ms, restore_ms = merge_restore_ms(adapted, stored, args.repeats)
    exact = all(torch.equal(adapted.layers[n].weight, w) for n, w in pristine.items())
    per_gb = int(args.memory_gb * 2**30 // max(res, 1))
    return {"method": method, "rank": rank, "file_bytes": len(data), "resident_bytes": res,
            "fit_in_memory": per_gb, "put_ms": put_ms, "get_ms": get_ms, "load_ms": load_ms,
            "prepare_ms": prepare_ms, "load_image_ms": load_image_ms, "image_is_row": image.row is not None,
            "unload_ms": unload_ms, "merge_ms": merge_ms, "restore_ms": restore_ms,
            "restore_bit_exact": exact}


def unload_only_ms(adapted, adapter, repeats: int) -> float:
    """Median ms of emptying a slot (what eviction costs before the next adapter is loaded)."""
    times = []
    for _ in range(repeats):
        adapted.load(1, adapter)
        t0 = time.perf_counter()
        adapted.unload(1)
        times.append(time.perf_counter() - t0)
    adapted.load(1, adapter)
    return 1000 * statistics.median(times)


def merge_restore_ms(adapted, adapter, repeats: int) -> tuple[float, float]:
    """Median ms of merge (W0 + ΔW into the weights) and of restore (pristine copy back)."""
    merge, restore = [], []
    adapted.merge(adapter)  # untimed: the first merge ever also snapshots the pristine weights (once per process)
    adapted.unmerge()
    for _ in range(repeats):
        t0 = time.perf_counter()
        adapted.merge(adapter)
        t1 = time.perf_counter()
        adapted.unmerge()
        merge.append(t1 - t0)
        restore.append(time.perf_counter() - t1)
    return 1000 * statistics.median(merge), 1000 * statistics.median(restore)


def cold_load(adapted, store, args) -> list[dict]:
    """Time to first token through the engine: base, adapter resident (warm), adapter only in the store
    (cold: parse from disk, load into a slot), and cold with every slot taken (evict, then load)."""
    from adapters.synthetic import random_adapter
    from server.config import EngineConfig
    from server.engine import Engine, GenerationRequest, SamplingParams

    for i in range(4):
        store.put(f"cold{i}", random_adapter("osora", adapted.spec, adapted.factors, 16, seed=100 + i).to_bytes())
    cfg = EngineConfig(max_batch_size=8, max_model_len=256, max_queue=64, max_resident_adapters=2, merge_policy="never")
    engine = Engine(cfg, adapted, adapted.base.tokenizer, store)
    engine.start()
    prompt = adapted.base.tokenizer.encode("Tell me about the sea.")

    async def first_token(adapter_id: str | None) -> float:
        req = GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(max_tokens=1, temperature=0), adapter_id)
        t0 = time.perf_counter()
        async for _ in engine.generate(req):
            break
        return 1000 * (time.perf_counter() - t0)

    async def scenario() -> list[dict]:
        rows = [{"case": "base model", "ttft_ms": await first_token(None)}]
        rows.append({"case": "adapter cold (store → slot)", "ttft_ms": await first_token("cold0")})
        rows.append({"case": "adapter warm (resident)", "ttft_ms": await first_token("cold0")})
        await first_token("cold1")  # both slots now taken
        rows.append({"case": "adapter cold, evicting the LRU slot", "ttft_ms": await first_token("cold2")})
        rows.append({"case": "base model again", "ttft_ms": await first_token(None)})
        return rows

    try:
        return asyncio.run(scenario())
    finally:
        engine.shutdown()
        stats = engine.stats()
        print(f"  engine: {stats['adapter_loads_total']} loads, {stats['adapter_evictions_total']} evictions")


# ---- cold loads under load ------------------------------------------------------------------------
def cold_under_load(adapted, store, args) -> list[dict]:
    """Cold-load cost while the engine is busy: `--streams` long streams decode on resident adapters while
    `--arrivals` short-request clients (closed loops) keep arriving. Two phases: their requests name one of a
    few resident adapters (warm), then the next of `--cycle-adapters` stored adapters in turn, none resident
    (cold: the route's resolve in a worker thread — parse on a parsed-cache miss — then a slot load and an
    LRU eviction in the engine). Prefix caching is off, so no phase reuses another's prompt K/V."""
    from adapters.synthetic import random_adapter
    from server.config import EngineConfig
    from server.engine import Engine
    from server.heap import freeze_startup_heap, thaw_heap

    slots = min(args.slots, adapted.n_slots - 1)
    cfg = EngineConfig(max_batch_size=args.streams + args.arrivals, max_model_len=256, max_queue=256,
                       max_resident_adapters=slots, merge_policy="never", prefix_caching=False)
    engine = Engine(cfg, adapted, adapted.base.tokenizer, store)
    freeze_startup_heap()  # as the server does at start, before any upload
    make = lambda name, seed: store.put(name, random_adapter(  # noqa: E731
        "osora", adapted.spec, adapted.factors, 16, seed=seed).to_bytes())
    t0 = time.perf_counter()
    for i in range(args.cycle_adapters):
        make(f"cyc{i}", 10_000 + i)
    for i in range(args.streams):
        make(f"long{i}", 20_000 + i)
    for i in range(WARM_ADAPTERS):
        make(f"warm{i}", 30_000 + i)
    print(f"  stored {args.cycle_adapters + args.streams + WARM_ADAPTERS} adapters in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    engine.start()
    prompt = adapted.base.tokenizer.encode("Write a short story about a lighthouse keeper and the sea.")
    cycle = (f"cyc{i % args.cycle_adapters}" for i in range(10**9))
    warm = (f"warm{i % WARM_ADAPTERS}" for i in range(10**9))
    try:
        asyncio.run(_warm_up(engine, prompt, args))
        rows = []
        for case, names in (("warm", warm), ("cold", cycle)):
            before, loads0 = engine.stats(), store.counters.loads
            with FullCollections() as gcs:
                r = asyncio.run(_load_phase(engine, prompt, names, args))
            after = engine.stats()
            r.update(full_gcs=len(gcs.pauses), full_gc_ms=1000 * sum(gcs.pauses))
            r.update(case=case, slot_loads=after["adapter_loads_total"] - before["adapter_loads_total"],
                     evictions=after["adapter_evictions_total"] - before["adapter_evictions_total"],
                     parses=store.counters.loads - loads0)
            rows.append(r)
            print(f"  {case}: {r}", flush=True)
        return rows
    finally:
        engine.shutdown()
        thaw_heap()


WARM_ADAPTERS = 8


class FullCollections:
    """Records the duration of every full (generation 2) garbage collection while it is entered: each holds
    the GIL, so every stream waits it out (server/heap.py)."""

    def __enter__(self) -> "FullCollections":
        self.pauses: list[float] = []
        self._t0 = 0.0
        gc.callbacks.append(self._observe)
        return self

    def _observe(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._t0)

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._observe)


async def _request(engine, prompt: list[int], adapter: str, max_tokens: int, rid: str) -> tuple[float, list[float]]:
    """One request through the route's path (server.api.generation: resolve in a worker thread, submit,
    stream); returns (TTFT s, gaps between outputs s)."""
    from server.api import generation
    from server.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    runs = await generation.start(engine, [prompt], params, f"default/{adapter}", 1, rid)
    times = []
    async for out in generation.outputs(runs[0]):
        if out.token_ids:
            times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])]


async def _warm_up(engine, prompt: list[int], args) -> None:
    """Every long stream's and warm adapter's first request (loads them), and the kernels' first shapes."""
    names = [f"long{i}" for i in range(args.streams)] + [f"warm{i}" for i in range(WARM_ADAPTERS)]
    await asyncio.gather(*(_request(engine, prompt, n, 4, uuid.uuid4().hex) for n in names))


async def _load_phase(engine, prompt: list[int], names, args) -> dict:
    """Long streams run `--phase-seconds`; arrival clients send requests naming `names` meanwhile."""
    gaps, ttfts, tokens, done = [], [], [], asyncio.Event()
    deadline = time.perf_counter() + args.phase_seconds

    async def long_stream(i: int) -> None:
        while time.perf_counter() < deadline:
            g = (await _request(engine, prompt, f"long{i}", args.long_tokens, uuid.uuid4().hex))[1]
            gaps.extend(g)
            tokens.append(len(g) + 1)

    async def arrivals() -> None:
        while not done.is_set():
            ttfts.append((await _request(engine, prompt, next(names), 2, uuid.uuid4().hex))[0])

    clients = [asyncio.ensure_future(arrivals()) for _ in range(args.arrivals)]
    t0 = time.perf_counter()
    await asyncio.gather(*(long_stream(i) for i in range(args.streams)))
    done.set()
    await asyncio.gather(*clients)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {"requests": len(ttfts), "seconds": time.perf_counter() - t0,
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "stream_tok_s": sum(tokens) / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> None:
    from adapters.runtime import load_adapted_model
    from server.store import AdapterStore

    args = parse_args(argv)
    t_start = time.perf_counter()
    adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=args.slots + 1,
                                 dtype=getattr(torch, args.dtype), progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="svdserve-ops-") as root:
        store = AdapterStore(root, adapted.spec)
        for rank in [int(r) for r in args.ranks.split(",")]:
            for method in args.methods.split(","):
                rows.append(method_row(adapted, store, method, rank, args))
                print(f"  {method} r={rank}: {rows[-1]}", flush=True)
        adapted.unload(1)
        cold = cold_load(adapted, store, args)
        busy = cold_under_load(adapted, store, args)
    print()
    print(table(rows, ["method", "rank", "file_bytes", "resident_bytes", "fit_in_memory", "put_ms", "get_ms",
                       "load_ms", "prepare_ms", "load_image_ms", "unload_ms", "merge_ms", "restore_ms", "restore_bit_exact"]))
    print()
    print(table(cold, ["case", "ttft_ms"]))
    print(f"\nunder load: {args.streams} streams of {args.long_tokens} tokens on resident adapters, {args.arrivals} "
          f"clients sending 2-token requests on warm adapters, then on {args.cycle_adapters} adapters cycling "
          f"through {args.slots} slots")
    print(table(busy, ["case", "requests", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "stream_tok_s",
                       "slot_loads", "evictions", "parses", "full_gcs", "full_gc_ms"]))
    write_results(args.name, {"dtype": args.dtype, "memory_gb": args.memory_gb, "repeats": args.repeats,
                              "seconds": time.perf_counter() - t_start, "methods": rows, "cold_load": cold,
                              "under_load": {"streams": args.streams, "arrivals": args.arrivals,
                                             "cycle_adapters": args.cycle_adapters, "slots": args.slots,
                                             "long_tokens": args.long_tokens, "phase_seconds": args.phase_seconds,
                                             "rows": busy}})


if __name__ == "__main__":
    main()
