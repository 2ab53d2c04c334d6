"""The fleet on Ray Serve: adapter affinity against random routing, and the cost of the Ray Serve path.

    python bench/fleet.py            # 1000 measured requests over 1000 adapters (about 30 min on 2 cores)
    python bench/fleet.py --quick    # 200 measured requests of 4 tokens (about 10 min)

1. Affinity: `python -m server fleet --replicas 2 --replica-cpus 1` with `--routing affinity` (Ray Serve's model
   multiplexing keyed tenant/adapter) and with `--routing random` (no multiplexed id: Ray's power-of-two-choices
   on queue length), the same closed-loop load each time: C streaming clients, request i for adapter
   a{zipf(i)} out of 1000 random OSoRA r=16 adapters (popularity Zipf, s = --zipf-s, a fixed seed), greedy,
   end-of-sequence ignored. A warm-up pass of --warmup requests from the same distribution (another seed) comes
   first, so the measured pass shows the steady state, not the first sight of each adapter. Cold loads =
   adapters put into a device slot by the engines (their counters, read from GET /fleet/replicas before and
   after), per 100 requests; each replica has --max-resident-adapters slots. `busiest_share` is the share of
   the requests the busiest replica answered.
   The same load on one plain server (2 threads, the same slots) is the reference row.
2. Overhead: the base model on one plain server against the fleet with one replica holding both CPUs — same
   engine, same cores, the difference is the path (Ray Serve proxy → ingress → replica): a 1-token request's
   latency (sequential, p50/p99) and streaming throughput at C clients.

The adapters are uploaded once (to the plain server) into one store directory, which every later server and
fleet uses, with its SQLite tenants' database (one machine: no PostgreSQL needed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

import servers
from common import percentile, table, write_results
from load_client import LoadSpec, run_load
from serve_load import PROMPTS, upload_adapters

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 measured requests of 4 tokens, 200 to warm up")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--requests", type=int, default=1000, help="measured requests per configuration")
    p.add_argument("--warmup", type=int, default=500, help="adapter requests before the measured ones")
    p.add_argument("--base-requests", type=int, default=400, help="measured base-model requests (overhead rows)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--zipf-s", type=float, default=1.0, help="adapter popularity exponent (0: uniform)")
    p.add_argument("--max-resident-adapters", type=int, default=64, help="device slots per replica/server")
    p.add_argument("--probes", type=int, default=40, help="sequential 1-token requests for the latency probe")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "factors"), help="factor cache directory")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "svdserve-bench-fleet"))
    p.add_argument("--routings", default="affinity,random", help="the 2-replica runs, in this order")
    p.add_argument("--only-routing", action="store_true",
                   help="skip the plain server and 1-replica rows (a re-measurement of the routing rows)")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.base_requests, args.max_tokens, args.probes = 200, 200, 100, 4, 20
    args.name = args.name or ("fleet_quick" if args.quick else "fleet")
    return args


# ---- servers ---------------------------------------------------------------------------------------
def server_args(args, store: Path) -> list[str]:
    return ["--store", str(store), "--cache-dir", args.cache_dir, "--max-resident-adapters",
            str(args.max_resident_adapters), "--log-level", "warning", *(["--model", args.model] if args.model else [])]


@contextmanager
def plain(args, store: Path, log_dir: Path):
    port = servers.free_port()
    with servers.svdserve(port, store, log_dir, server_args(args, store)[2:]):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def fleet(args, store: Path, log_dir: Path, replicas: int, cpus: float, routing: str):
    """`python -m server fleet` in its own session; ready when every replica reports. SIGTERM stops it (the
    launcher removes the application and stops its Ray cluster); what is left of its session is killed."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "fleet", "--replicas", str(replicas), "--replica-cpus", str(cpus),
           "--routing", routing, "--port", str(port), *server_args(args, store)]
    log_path = log_dir / f"fleet-{replicas}-{routing}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    try:
        _wait_ready(proc, url, replicas, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, replicas: int, log_path: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet exited with {proc.returncode}; see {log_path}")
        try:
            if len(httpx.get(url + "/fleet/replicas", timeout=5).json()["replicas"]) == replicas:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"fleet not ready within {timeout:.0f} s; see {log_path}")


# ---- measurements ----------------------------------------------------------------------------------
def zipf_sequence(n_adapters: int, n_requests: int, s: float, seed: int = 0) -> list[int]:
    """Adapter index per request: rank k has popularity 1/k^s, ranks shuffled over the ids."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_adapters + 1) ** s
    ranks = rng.choice(n_adapters, size=n_requests, p=weights / weights.sum())
    return [int(i) for i in rng.permutation(n_adapters)[ranks]]


def load(url: str, args, body, requests: int | None = None) -> dict:
    per_client = max(1, (requests or args.requests) // args.clients)
    spec = LoadSpec(url=url, clients=args.clients, requests_per_client=per_client, max_tokens=args.max_tokens,
                    prompts=PROMPTS, body=body)
    row = asyncio.run(run_load(spec))
    return row | {"req_s": row["requests"] / row["seconds"]}


def warm_adapters(url: str, args) -> None:
    if args.warmup:
        load(url, args, adapter_body(zipf_sequence(args.adapters, args.warmup, args.zipf_s, seed=1)), args.warmup)


def adapter_body(sequence: list[int]):
    return lambda i: {"ignore_eos": True, "return_token_ids": True, "adapter_id": f"a{sequence[i % len(sequence)]}"}


def base_body(i: int) -> dict:
    return {"ignore_eos": True, "return_token_ids": True}


def latency_probe(url: str, n: int) -> dict:
    """Sequential 1-token base-model requests (not streamed): the path's own cost per request."""
    times = []
    with httpx.Client(timeout=60) as c:
        for i in range(n + 3):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1,
                                                      "temperature": 0})
            r.raise_for_status()
            if i >= 3:  # the first few warm the connection and the path
                times.append(time.perf_counter() - t0)
    return {"latency_p50_ms": 1000 * percentile(times, 50), "latency_p99_ms": 1000 * percentile(times, 99)}


def fleet_counters(url: str) -> dict[str, dict]:
    time.sleep(1.5)  # replicas report every second
    return {r["replica"]: r for r in httpx.get(url + "/fleet/replicas", timeout=30).json()["replicas"]}


def plain_counters(url: str) -> dict[str, int | None]:
    """The plain server's adapter slot loads and parses, from its /metrics (None where it has no such series)."""
    text = httpx.get(url + "/metrics", timeout=30).text

    def value(pattern: str) -> int | None:
        m = re.search(pattern + r"\s+([0-9.e+]+)$", text, re.M)
        return int(float(m.group(1))) if m else None

    return {"slot_loads": value(r"^svdserve_adapter_loads_total"),
            "parses": value(r'^svdserve_adapter_cache_loads_total\{tier="host"\}')}


def affinity_row(url: str, args, sequence: list[int], label: str) -> dict:
    warm_adapters(url, args)
    before = fleet_counters(url)
    row = load(url, args, adapter_body(sequence))
    after = fleet_counters(url)

    def delta(rid: str, get) -> int:
        old = before.get(rid)
        return get(after[rid]) - (get(old) if old else 0)  # a replica new since `before` started at 0

    per_replica = {rid: {"requests": delta(rid, lambda r: r["requests"]),
                         "slot_loads": delta(rid, lambda r: r["engine"]["adapter_loads_total"]),
                         "parses": delta(rid, lambda r: r.get("store", {}).get("loads", 0))} for rid in after}
    total = {k: sum(d[k] for d in per_replica.values()) for k in ("requests", "slot_loads", "parses")}
    n = max(1, row["requests"])
    row.update(config=label, cold_loads=total["slot_loads"], cold_per_100=100 * total["slot_loads"] / n,
               parses_per_100=100 * total["parses"] / n, per_replica=per_replica,
               busiest_share=max(d["requests"] for d in per_replica.values()) / max(1, total["requests"]))
    return row


def show(row: dict) -> None:
    cold = "" if row.get("cold_per_100") is None else f"  cold loads/100 {row['cold_per_100']:.1f}"
    lat = "" if row.get("latency_p50_ms") is None else f"  1-token p50 {row['latency_p50_ms']:.1f} ms"
    print(f"  {row['config']:52s} {row['req_s']:5.2f} req/s {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:.0f} ms{cold}{lat}"
          f"  errors {row['errors']}", flush=True)


# ---- main ------------------------------------------------------------------------------------------
def run(args, work: Path, store: Path) -> list[dict]:
    logs, rows = work / "logs", []
    sequence = zipf_sequence(args.adapters, args.requests, args.zipf_s)
    if not args.only_routing:
        rows += overhead_rows(args, store, logs, sequence)
    else:  # the adapters go in through a plain server, as in the full run (no fleet replica starts warm)
        with plain(args, store, logs) as url:
            upload_adapters(url, args.adapters, args)
    for routing in args.routings.split(","):
        with fleet(args, store, logs, 2, 1, routing) as url:
            load(url, args, base_body, 4 * args.clients)
            row = affinity_row(url, args, sequence, f"fleet, 2 replicas, {routing} routing: {args.adapters} adapters")
            show(row)
            rows.append(row)
    return rows


def overhead_rows(args, store: Path, logs: Path, sequence: list[int]) -> list[dict]:
    """The plain server (base model, and the adapter load) and the fleet of one replica (base model)."""
    rows = []
    with plain(args, store, logs) as url:
        print(f"uploading {args.adapters} adapters", flush=True)
        upload_adapters(url, args.adapters, args)
        load(url, args, base_body, 4 * args.clients)  # warm
        base = load(url, args, base_body, args.base_requests) | latency_probe(url, args.probes) | {"config": "plain server: base model"}
        show(base)
        warm_adapters(url, args)
        before = plain_counters(url)
        row = load(url, args, adapter_body(sequence)) | {"config": f"plain server (2 threads): {args.adapters} adapters"}
        after, n = plain_counters(url), max(1, row["requests"])
        for key, column in (("slot_loads", "cold_per_100"), ("parses", "parses_per_100")):
            if before[key] is not None and after[key] is not None:
                row[column] = 100 * (after[key] - before[key]) / n
        show(row)
        rows += [base, row]
    with fleet(args, store, logs, 1, 2, "affinity") as url:
        load(url, args, base_body, 4 * args.clients)
        row = load(url, args, base_body, args.base_requests) | latency_probe(url, args.probes) | {"config": "fleet, 1 replica (2 CPUs): base model"}
        show(row)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="store-", dir=work) as store:
        rows = run(args, work, Path(store))
    print()
    print(table(rows, ["config", "req_s", "tok_s", "ttft_p50_ms", "itl_p50_ms", "cold_per_100", "parses_per_100", "busiest_share",
                       "latency_p50_ms", "latency_p99_ms", "errors"],
                {"req_s": 2, "ttft_p50_ms": 0, "itl_p50_ms": 1, "busiest_share": 2}))
    write_results(args.name, {"adapters": args.adapters, "requests": args.requests, "warmup": args.warmup,
                              "clients": args.clients,
                              "max_tokens": args.max_tokens, "zipf_s": args.zipf_s,
                              "max_resident_adapters": args.max_resident_adapters, "routings": args.routings,
                              "seconds": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
