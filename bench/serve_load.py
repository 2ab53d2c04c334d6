"""End-to-end serving over HTTP: N concurrent streaming clients, requests spread over K adapters, against
svdserve, the base model alone on svdserve, llama.cpp's llama-server (same GGUF, 32 slots, PEFT LoRAs
converted with convert_lora_to_gguf.py) and `transformers serve --continuous-batching` (base model).

    python bench/serve_load.py --llama-server /work/llama.cpp-build/build/bin/llama-server
    python bench/serve_load.py --quick          # 32 clients, base and 32 adapters (about 1.5 min on 2 cores)

Each request streams `--max-tokens` greedy tokens (end-of-sequence ignored). Reported per cell: aggregate
tokens/s, time to first token and inter-token latency (p50/p99), and errors (must be 0). Request i of
the load goes to adapter i mod K, and the N clients' concurrent requests are consecutive, so with K >= N
every running batch holds N distinct adapters. svdserve's adapters are random OSoRA r=16 (uploaded with
PUT /adapters/{id}); with K = 1000 and 64 resident slots nearly every request loads its adapter cold.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from common import percentile, table, write_results
from load_client import LoadSpec, run_load
import servers

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright when it is moving.",
    "List five ideas for a birthday party for a ten year old.",
    "Describe the water cycle to a child.",
    "What are the main differences between a cat and a dog as pets?",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective novel in a few sentences.",
    "Why is the sky blue? Answer in plain words.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 clients, base and 32 adapters, svdserve and llama-server")
    p.add_argument("--clients", default="8,32,64")
    p.add_argument("--adapters", default="0,1,32,1000", help="K values (0 = base model)")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--cache-dir", default=None, help="svdserve factor cache directory")
    p.add_argument("--server-args", default="", help="extra options for python -m server")
    p.add_argument("--url", default=None, help="use this running svdserve instead of starting one")
    p.add_argument("--no-svdserve", action="store_true", help="measure the baselines only")
    p.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    p.add_argument("--llama-convert", default=None, help="path of convert_lora_to_gguf.py (default: found near the binary)")
    p.add_argument("--llama-loras", default="1,32", help="K values for llama-server's LoRAs")
    p.add_argument("--threads", type=int, default=None, help="llama-server -t (default: its own choice)")
    p.add_argument("--transformers-serve", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "svdserve-bench"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.adapters, args.requests_per_client, args.max_tokens = "32", "0,32", 1, 24
        args.llama_loras, args.transformers_serve = "32", False
    args.name = args.name or ("serve_load_quick" if args.quick else "serve_load")
    return args


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def measure(url: str, clients: list[int], args, body, label: str, server: str, k: int) -> list[dict]:
    rows = []
    for n in clients:
        spec = LoadSpec(url=url, clients=n, requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
                        prompts=PROMPTS, body=body)
        r = asyncio.run(run_load(spec))
        r.update(server=server, config=label, adapters=k, clients=n)
        print(f"  {label:38s} N={n:3d}  {r['tok_s']:7.1f} tok/s  TTFT p50 {_ms(r['ttft_p50_ms'])}  "
              f"ITL p50/p99 {_ms(r['itl_p50_ms'])}/{_ms(r['itl_p99_ms'])}  errors {r['errors']}", flush=True)
        rows.append(r)
    return rows


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f} ms"


def warm(url: str, body) -> None:
    spec = LoadSpec(url=url, clients=2, requests_per_client=1, max_tokens=8, prompts=PROMPTS, body=body)
    asyncio.run(run_load(spec))


# ---- svdserve --------------------------------------------------------------------------------------
def upload_adapters(url: str, n: int, args) -> list[float]:
    """PUT n random OSoRA r=16 adapters (ids a0..a{n-1}); returns the upload latencies in seconds."""
    from adapters.synthetic import random_adapter

    spec, factors = _spec_and_factors(args)
    latencies = []
    with httpx.Client(timeout=60) as client:
        have = {a["id"] for a in client.get(url + "/adapters").json()["data"]}
        for i in range(n):
            if f"a{i}" in have:
                continue
            data = random_adapter("osora", spec, factors, 16, seed=i).to_bytes()
            t0 = time.perf_counter()
            r = client.put(f"{url}/adapters/a{i}", content=data)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
    return latencies


def _spec_and_factors(args):
    if not hasattr(args, "_factors"):
        from adapters.base_model import load_base_model
        from adapters.factors import load_or_build_factors
        from adapters.file import BaseSpec

        base = load_base_model(args.model)
        factors = load_or_build_factors(base.targets, base.fingerprint, 64, args.cache_dir, progress=False)
        args._factors = (BaseSpec(shapes=base.shapes(), r_max=64, fingerprint=base.fingerprint), factors)
    return args._factors


def svd_body(k: int):
    extra = {"ignore_eos": True, "return_token_ids": True}
    return (lambda i: extra) if k == 0 else (lambda i: {**extra, "adapter_id": f"a{i % k}"})


def run_svdserve(url: str, args, clients: list[int]) -> tuple[list[dict], dict]:
    rows, uploads = [], {}
    for k in ints(args.adapters):
        if k:
            lat = upload_adapters(url, k, args)
            if lat:
                uploads = {"n": len(lat), "p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99)}
                print(f"  uploaded {len(lat)} adapters: p50 {uploads['p50_ms']:.0f} ms, p99 {uploads['p99_ms']:.0f} ms")
        warm(url, svd_body(k))
        label = "svdserve base model" if k == 0 else f"svdserve OSoRA r=16, K={k}"
        rows += measure(url, clients, args, svd_body(k), label, "svdserve", k)
    return rows, uploads


# ---- baselines -------------------------------------------------------------------------------------
def run_llama(args, clients: list[int], work: Path) -> list[dict]:
    from adapters.base_model import default_model_path
    from llama_assets import find_convert_script, lora_ggufs

    convert = find_convert_script(args.llama_server, args.llama_convert)
    ks = ints(args.llama_loras)
    loras = lora_ggufs(work, args.model, max(ks), convert) if ks and convert else []
    if ks and not convert:
        print("  convert_lora_to_gguf.py not found (--llama-convert): llama-server runs the base model only")
    gguf = args.model or default_model_path()
    ctx = 64 + args.max_tokens + 32
    rows = []
    # the base model on a server without LoRAs (a loaded LoRA at scale 0 still costs), then K LoRAs
    for k in [0] + (ks if loras else []):
        port = servers.free_port()
        with servers.llama_server(args.llama_server, gguf, port, 32, ctx, loras[:k], work / "logs", args.threads):
            url = f"http://127.0.0.1:{port}"
            body = (lambda i: {"ignore_eos": True}) if k == 0 else \
                   (lambda i, k=k: {"ignore_eos": True, "lora": [{"id": i % k, "scale": 1.0}]})
            warm(url, body)
            label = "llama-server base model" if k == 0 else f"llama-server LoRA r=16, K={k}"
            rows += measure(url, clients, args, body, label, "llama-server", k)
    return rows


def run_transformers(args, clients: list[int], work: Path) -> list[dict]:
    from llama_assets import base_hf_dir

    model_dir = base_hf_dir(work, args.model)
    port = servers.free_port()
    with servers.transformers_serve(model_dir, port, work / "logs", "float32"):
        url = f"http://127.0.0.1:{port}"
        body = lambda i: {"model": str(model_dir)}  # noqa: E731
        warm(url, body)
        return measure(url, clients, args, body, "transformers serve base model", "transformers", 0)


def baseline(fn, name: str, failures: dict[str, str], *a) -> list[dict]:
    """Run one baseline server; a baseline that cannot start is reported, not fatal to svdserve's figures."""
    try:
        return fn(*a)
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        failures[name] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"  {name} failed: {failures[name]}")
        return []


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clients = ints(args.clients)
    t_start = time.perf_counter()
    rows: list[dict] = []
    svd_rows, uploads = [], {}
    if args.no_svdserve:
        pass
    elif args.url:
        svd_rows, uploads = run_svdserve(args.url, args, clients)
    else:
        print("svdserve", flush=True)
        port = servers.free_port()
        extra = (["--cache-dir", args.cache_dir] if args.cache_dir else []) + args.server_args.split()
        with tempfile.TemporaryDirectory(prefix="svdserve-store-") as store, \
                servers.svdserve(port, Path(store), work / "logs", extra):
            svd_rows, uploads = run_svdserve(f"http://127.0.0.1:{port}", args, clients)
    rows += svd_rows
    failures: dict[str, str] = {}
    if args.llama_server:
        print("llama-server", flush=True)
        rows += baseline(run_llama, "llama-server", failures, args, clients, work)
    else:
        print("llama-server: skipped (pass --llama-server PATH; docs/benchmarks.md says how to build it)")
    if args.transformers_serve:
        print("transformers serve", flush=True)
        rows += baseline(run_transformers, "transformers serve", failures, args, clients, work)
    print()
    print(table(rows, ["config", "clients", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "errors"],
                {"ttft_p50_ms": 0, "ttft_p99_ms": 0, "itl_p50_ms": 0, "itl_p99_ms": 0}))
    write_results(args.name, {"max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
                              "uploads": uploads, "baseline_failures": failures, "seconds": time.perf_counter() - t_start, "rows": rows})


if __name__ == "__main__":
    main()
