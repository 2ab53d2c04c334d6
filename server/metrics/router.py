"""Gauges and counters read from the engine and the store when /metrics is scraped.

The model-server protocol of the Gateway API Inference Extension (and llm-d's router), named as vLLM names them,
so an existing router does load-aware and LoRA-affinity routing to svdserve pods unchanged:

* `vllm:num_requests_running`, `vllm:num_requests_waiting` — requests in the batch / in the queue;
* `vllm:kv_cache_usage_perc` — the share of KV blocks held by running requests (0..1, as vLLM reports it);
* `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` — the adapters of the
  running and the waiting requests, comma-separated, each named as the request's `model` names it (the bare id
  for the caller's own adapter, `owner/id` for another tenant's public one); the value is the time (Unix
  seconds) the two lists last changed.

Beside them the engine's own statistics as `svdserve_<name>` (as before), and the adapter caches' hits, loads and
evictions by tier: `device` (resident slots), `host` (parsed adapters in memory), `disk` (the S3 store's file
cache).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.store import DEFAULT_TENANT

ENGINE_GAUGES = {"running", "waiting", "resident_adapters", "merged"}  # the engine's other stats count up
# the names routers read (the inference gateway's endpoint picker flags name them: deploy/k8s/inferencepool.yaml)
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_USAGE, LORA_INFO = "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float  # 0..1
    running_adapters: tuple[str, ...]  # sorted, unique, as requests name them
    waiting_adapters: tuple[str, ...]


def shown(seq) -> str | None:
    """The adapter of a sequence as its request's `model` named it; None for the base model."""
    if seq.adapter_key is None:
        return None
    owner, _, adapter_id = seq.adapter_key[0].partition("/")
    tenant = seq.tenant or DEFAULT_TENANT
    return adapter_id if owner == tenant else f"{owner}/{adapter_id}"


def engine_load(engine) -> EngineLoad:
    """One consistent snapshot of the scheduler, taken under the engine's lock (a few list copies)."""
    with engine._lock:
        sched = engine.scheduler
        running, waiting = list(sched.running), list(sched.waiting)
        kv = getattr(sched, "kv", None)
        usage = kv.num_used / max(1, kv.num_blocks - 1) if kv is not None else 0.0

    def names(seqs) -> tuple[str, ...]:
        return tuple(sorted({n for n in map(shown, seqs) if n is not None}))

    return EngineLoad(len(running), len(waiting), usage, names(running), names(waiting))


class EngineCollector(Collector):
    """Collects the router gauges, the engine's stats and the adapter cache counters at scrape time."""

    def __init__(self, engine, store, model_name: str, max_lora: int):
        self.engine, self.store, self.model_name, self.max_lora = engine, store, model_name, max_lora
        self._lora: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._lora_changed = time.time()

    def describe(self) -> list:
        return []  # the families are only known once collected (the engine's stats may grow)

    def collect(self) -> Iterator:
        load = engine_load(self.engine)
        yield from self._router(load)
        stats = self.engine.stats()
        for key in sorted(stats):
            value = stats[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = "svdserve_" + "".join(c if c.isalnum() or c == "_" else "_" for c in key)
            kind = GaugeMetricFamily if key in ENGINE_GAUGES or not key.endswith("_total") else CounterMetricFamily
            yield kind(name, f"svdserve engine statistic {key}", value=float(value))
        yield from self._adapter_caches(stats)

    def _router(self, load: EngineLoad) -> Iterator:
        labels, values = ["model_name"], [self.model_name]
        for name, doc, value in ((RUNNING, "Requests in the running batch", load.running),
                                 (WAITING, "Requests waiting to be admitted", load.waiting),
                                 (KV_USAGE, "KV cache usage (1 = 100 percent)", load.kv_usage)):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            yield g
        lists = (load.running_adapters, load.waiting_adapters)
        if lists != self._lora:
            self._lora, self._lora_changed = lists, time.time()
        info = GaugeMetricFamily(LORA_INFO, "Adapters of the running and waiting requests; the "
                                 "value is when these lists last changed (Unix time)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(self.max_lora), ",".join(lists[0]), ",".join(lists[1])], self._lora_changed)
        yield info

    def _adapter_caches(self, stats: dict) -> Iterator:
        c = self.store.counters
        tiers = {"hits": {"host": c.hits, "disk": c.disk_hits},
                 "loads": {"device": stats.get("adapter_loads_total", 0), "host": c.loads, "disk": c.downloads},
                 "evictions": {"device": stats.get("adapter_evictions_total", 0), "host": c.evictions,
                               "disk": c.disk_evictions}}
        docs = {"hits": "Adapter lookups answered by a cache tier",
                "loads": "Adapters brought into a tier (device: into a slot; host: parsed; disk: downloaded)",
                "evictions": "Adapters evicted from a tier to make room"}
        for what, by_tier in tiers.items():
            fam = CounterMetricFamily(f"svdserve_adapter_cache_{what}", docs[what], labels=["tier"])
            for tier, value in by_tier.items():
                fam.add_metric([tier], float(value))
            yield fam
