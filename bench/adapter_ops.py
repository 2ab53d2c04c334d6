"""The cost of adapter operations: upload (store put: parse, validate, atomic write), cold load (store →
resident → first token, through the engine), eviction, merge and restore, bytes per adapter on disk and
resident, and how many adapters fit resident in a given memory.

    python bench/adapter_ops.py              # OSoRA, LoRA-XS, VeRA, LoRA, SORSA at r=16 and r=64
    python bench/adapter_ops.py --quick      # r=16 only, fewer repetitions (< 2 min)

HTTP upload latency (the same store put behind PUT /adapters/{id}) is reported by bench/serve_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import torch

from common import table, write_results

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
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.repeats = "16", 2
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
    """Store put/get, load into a slot, unload (eviction), merge and restore for one method and rank."""
    from adapters.synthetic import random_adapter

    a = random_adapter(method, adapted.spec, adapted.factors, rank, seed=7)
    data = a.to_bytes()
    aid = f"{method}-r{rank}"
    put_ms = med_ms(lambda: store.put(aid, data), args.repeats)
    get_ms = med_ms(lambda: store.get(aid), args.repeats)
    stored = store.get(aid).adapter
    load_ms = med_ms(lambda: adapted.load(1, stored), args.repeats)
    res = resident_bytes(adapted, method, 1)
    unload_ms = unload_only_ms(adapted, stored, args.repeats)
    pristine = {n: l.weight.detach().clone() for n, l in list(adapted.layers.items())[:3]}
    merge_ms, restore_ms = merge_restore_ms(adapted, stored, args.repeats)
    exact = all(torch.equal(adapted.layers[n].weight, w) for n, w in pristine.items())
    per_gb = int(args.memory_gb * 2**30 // max(res, 1))
    return {"method": method, "rank": rank, "file_bytes": len(data), "resident_bytes": res,
            "fit_in_memory": per_gb, "put_ms": put_ms, "get_ms": get_ms, "load_ms": load_ms,
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


def main(argv: list[str] | None = None) -> None:
    from adapters.runtime import load_adapted_model
    from server.store import AdapterStore

    args = parse_args(argv)
    t_start = time.perf_counter()
    adapted = load_adapted_model(args.model, r_max=64, cache_dir=args.cache_dir, n_slots=3,
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
    print()
    print(table(rows, ["method", "rank", "file_bytes", "resident_bytes", "fit_in_memory", "put_ms", "get_ms",
                       "load_ms", "unload_ms", "merge_ms", "restore_ms", "restore_bit_exact"]))
    print()
    print(table(cold, ["case", "ttft_ms"]))
    write_results(args.name, {"dtype": args.dtype, "memory_gb": args.memory_gb, "repeats": args.repeats,
                              "seconds": time.perf_counter() - t_start, "methods": rows, "cold_load": cold})


if __name__ == "__main__":
    main()
