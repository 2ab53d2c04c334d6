"""Per-request metrics, observed as the engine's outputs reach the HTTP layer (server/api/generation.py) and as
the engine admits requests (its `observer` hook): one registry per app, so several apps in one process (tests)
never share series."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from server.metrics.labels import BoundedLabels

# the buckets vLLM uses, so dashboards built for it read ours the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = tuple(sorted({0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, *REQUEST_BUCKETS}))
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_MAX_TENANTS = 64


@dataclass
class _Timing:
    submitted: float
    tenant: str
    last_token: float | None = None  # when its latest token arrived (None: no token yet)


class Metrics:
    """The app's registry and its request-level instruments."""

    def __init__(self, max_tenants: int = DEFAULT_MAX_TENANTS):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("svdserve_time_to_first_token_seconds", "Time from submission to the first "
                              "generated token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("svdserve_inter_token_latency_seconds", "Time between consecutive generated tokens "
                             "of a request", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("svdserve_e2e_request_latency_seconds", "Time from submission to the last output",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("svdserve_request_queue_time_seconds", "Time from submission to admission into "
                               "the running batch", buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("svdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("svdserve_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.requests = Counter("svdserve_finished_requests", "Finished engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.tenant_requests = Counter("svdserve_tenant_requests", "Finished engine requests per tenant (the "
                                       "first --metrics-max-tenants tenants seen; later ones as _other)",
                                       ["tenant"], registry=r)
        self.tenant_prompt_tokens = Counter("svdserve_tenant_prompt_tokens", "Prompt tokens per tenant", ["tenant"],
                                            registry=r)
        self.tenant_generation_tokens = Counter("svdserve_tenant_generation_tokens", "Generated tokens per tenant",
                                                ["tenant"], registry=r)
        self.adapter_load = Histogram("svdserve_adapter_load_seconds", "Reading (or downloading) and parsing an "
                                      "adapter version not in the host cache", buckets=LOAD_BUCKETS, registry=r)
        self.tenant_label = BoundedLabels(max_tenants)
        self._timings: dict[str, _Timing] = {}
        self._waiting: dict[str, float] = {}  # submitted, not yet admitted: request id -> submission time

    # ---- hooks --------------------------------------------------------------------------------------
    def submitted(self, request_id: str, tenant: str) -> None:
        """An engine request was handed to the engine."""
        now = time.monotonic()
        self._timings[request_id] = _Timing(now, tenant or "default")
        self._waiting[request_id] = now

    def on_step(self, sched) -> None:
        """The engine scheduled a step (called in its thread): requests in it for the first time were admitted."""
        now = time.monotonic()
        for seq in sched.seqs:
            t = self._waiting.pop(seq.request_id, None)
            if t is not None:
                self.queue.observe(now - t)

    def output(self, request_id: str, out) -> None:
        """One RequestOutput reached the HTTP layer."""
        timing = self._timings.get(request_id)
        if timing is None:
            return
        now = time.monotonic()
        if out.token_ids:
            if timing.last_token is None:
                self.ttft.observe(now - timing.submitted)
            else:
                gap = (now - timing.last_token) / len(out.token_ids)
                for _ in out.token_ids:
                    self.itl.observe(gap)
            timing.last_token = now
        if out.finished:
            self._finish(request_id, timing, now, out.finish_reason or "abort", out.prompt_tokens,
                         out.completion_tokens)

    def abandoned(self, request_id: str) -> None:
        """A request was aborted before its last output reached the HTTP layer (the client went away)."""
        timing = self._timings.get(request_id)
        if timing is not None:
            self._finish(request_id, timing, time.monotonic(), "abort", 0, 0)

    def _finish(self, request_id: str, timing: _Timing, now: float, reason: str, prompt: int, generated: int) -> None:
        self._timings.pop(request_id, None)
        self._waiting.pop(request_id, None)
        self.e2e.observe(now - timing.submitted)
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        tenant = self.tenant_label(timing.tenant)
        self.tenant_requests.labels(tenant).inc()
        self.tenant_prompt_tokens.labels(tenant).inc(prompt)
        self.tenant_generation_tokens.labels(tenant).inc(generated)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in the registry."""
        return generate_latest(self.registry)
