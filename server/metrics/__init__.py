"""Metrics for operators and routers (prometheus_client), served at GET /metrics:

* `requests.py` — per-request latencies (time to first token, inter-token latency, end-to-end, queue time),
  prompt and generated token counters, per-tenant counters with a bounded set of tenant labels.
* `router.py` — what the Kubernetes Gateway API Inference Extension / llm-d router reads, named as vLLM names
  them (`vllm:num_requests_running|waiting`, `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`), and the
  adapter caches' hits, loads and evictions, all read from the engine and the store at scrape time.
"""

from server.metrics.requests import Metrics

__all__ = ["Metrics"]
