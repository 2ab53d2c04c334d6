"""GET /metrics and request ids on a real server process (a tiny model, two tenants): after mixed traffic every
metric and label is there, parsed with prometheus_client's parser; `vllm:lora_requests_info` names exactly the
adapters of the running batch and of the queue, as the requests named them; a real Prometheus (Debian's package)
scrapes the server; every log line of a request carries its X-Request-Id, which the response echoes."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.synthetic import random_adapter
from server.store import adapter_nbytes
from tests.conftest import ServerProcess, free_port, start_server, stop_server, tiny_chat_model

ADMIN = "metrics-test-admin-key-0123456789"
R_MAX = 16
MAX_TOKENS = 200  # long enough that scrapes see the batch while it runs


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("metrics")
    base = tiny_chat_model()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    made = [random_adapter("osora", spec, factors, rank=4, seed=i) for i in range(3)]
    # the host cache holds one parsed adapter: switching adapters loads and evicts, repeating one hits
    one = adapter_nbytes(made[0])
    server = start_server(tmp, "--model", tiny_model_dir, "--max-rank", str(R_MAX), "--max-model-len", "256",
                          "--cache-dir", str(tmp / "factors"), "--admin-key", ADMIN, "--max-batch-size", "2",
                          "--metrics-max-tenants", "2", "--parsed-adapter-cache-bytes", str(one * 3 // 2))
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {}
        for name in ("alice", "bob", "carol"):
            assert httpx.post(f"{server.url}/admin/tenants", json={"name": name}, headers=admin).status_code == 201
            keys[name] = httpx.post(f"{server.url}/admin/tenants/{name}/keys", json={}, headers=admin).json()["key"]
        for adapter, (tenant, name) in zip(made, (("alice", "a1"), ("alice", "a2"), ("bob", "b1"))):
            r = httpx.put(f"{server.url}/adapters/{name}", content=adapter.to_bytes(), headers=_auth(keys[tenant]))
            assert r.status_code == 201, r.text
        yield server, keys
    finally:
        stop_server(server)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def scrape(url: str) -> dict[str, list]:
    """metric family name -> its samples, parsed by prometheus_client."""
    text = httpx.get(url + "/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels) -> float:
    """The sum of the samples called `name` (a counter's `_total`, a histogram's `_count`, ...) with `labels`."""
    samples = [s for f in families.values() for s in f if s.name == name]
    assert samples, f"no sample {name}"
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def stream(url: str, key: str, model: str, max_tokens: int, started: threading.Event) -> None:
    body = {"model": model, "prompt": "once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=_auth(key), timeout=120) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            started.set()


def test_router_gauges_name_exactly_the_adapters_in_the_batch_and_the_queue(srv):
    server, keys = srv
    fam = scrape(server.url)
    info = fam["vllm:lora_requests_info"][0]
    assert info.labels == {"max_lora": "64", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert value(fam, "vllm:num_requests_running") == 0 and value(fam, "vllm:num_requests_waiting") == 0
    threads = []
    for tenant, model in (("alice", "a1"), ("bob", "b1"), ("alice", "a2")):  # batch of 2: a2 waits
        started = threading.Event()
        t = threading.Thread(target=stream, args=(server.url, keys[tenant], model, MAX_TOKENS, started))
        t.start()
        threads.append(t)
        if model != "a2":
            assert started.wait(60)
    seen = None
    deadline = time.monotonic() + 60
    while seen is None and time.monotonic() < deadline:
        fam = scrape(server.url)
        if value(fam, "vllm:num_requests_running") == 2 and value(fam, "vllm:num_requests_waiting") == 1:
            seen = fam
    for t in threads:
        t.join(120)
    assert seen is not None, "never saw a1 and b1 running with a2 waiting"
    info = seen["vllm:lora_requests_info"][0]
    assert info.labels["running_lora_adapters"] == "a1,b1" and info.labels["waiting_lora_adapters"] == "a2"
    assert info.value > time.time() - 120  # when the lists last changed
    assert 0 < value(seen, "vllm:kv_cache_usage_perc") <= 1
    assert seen["vllm:num_requests_running"][0].labels["model_name"].startswith("tiny-model")
    fam = scrape(server.url)
    assert value(fam, "vllm:num_requests_running") == 0
    assert fam["vllm:lora_requests_info"][0].labels["running_lora_adapters"] == ""


def test_every_metric_after_mixed_traffic(srv):
    server, keys = srv
    before = scrape(server.url)
    done = value(before, "svdserve_finished_requests_total", finish_reason="length")
    base = httpx.get(server.url + "/health").json()["model"]
    for tenant, model in (("bob", "b1"), ("alice", "a1"), ("alice", "a1"), ("carol", base)):
        body = {"model": model, "prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=_auth(keys[tenant]), timeout=60)
        assert r.status_code == 200, r.text
    fam = scrape(server.url)
    assert value(fam, "svdserve_finished_requests_total", finish_reason="length") >= done + 4
    for h in ("svdserve_time_to_first_token_seconds", "svdserve_inter_token_latency_seconds",
              "svdserve_e2e_request_latency_seconds", "svdserve_request_queue_time_seconds",
              "svdserve_adapter_load_seconds"):
        count = next(s.value for s in fam[h] if s.name == h + "_count")
        assert count >= (1 if h == "svdserve_adapter_load_seconds" else 4), h
        assert next(s for s in fam[h] if s.name == h + "_bucket" and s.labels["le"] == "+Inf").value == count
    assert value(fam, "svdserve_inter_token_latency_seconds_count") >= 4 * 4  # 4 gaps per 5-token request
    gen = value(fam, "svdserve_generation_tokens_total") - value(before, "svdserve_generation_tokens_total")
    assert gen == 4 * 5
    assert value(fam, "svdserve_prompt_tokens_total") > value(before, "svdserve_prompt_tokens_total")
    # --metrics-max-tenants 2: alice and bob by name (first seen), carol as _other
    tenants = {s.labels["tenant"] for s in fam["svdserve_tenant_requests"] if s.name.endswith("_total")}
    assert tenants == {"alice", "bob", "_other"}
    assert value(fam, "svdserve_tenant_generation_tokens_total", tenant="_other") >= 5
    for what in ("hits", "loads", "evictions"):
        assert {s.labels["tier"] for s in fam[f"svdserve_adapter_cache_{what}"]} >= {"host"}
    assert value(fam, "svdserve_adapter_cache_loads_total", tier="device") >= 3  # a1, a2, b1 into slots
    for what in ("loads", "evictions", "hits"):  # b1 (loaded, a2 out), a1 (loaded, b1 out), a1 again (a hit)
        assert value(fam, f"svdserve_adapter_cache_{what}_total", tier="host") >= value(
            before, f"svdserve_adapter_cache_{what}_total", tier="host") + (2 if what != "hits" else 1), what
    for name in ("svdserve_running", "svdserve_waiting", "svdserve_requests"):
        assert name in fam, name


def test_request_ids_are_echoed_and_on_every_log_line_of_the_request(srv):
    server, keys = srv
    r = httpx.post(server.url + "/v1/completions", headers={**_auth(keys["alice"]), "X-Request-Id": "trace-42"},
                   json={"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and r.headers["x-request-id"] == "trace-42"
    made = httpx.get(server.url + "/health").headers["x-request-id"]
    assert len(made) == 32 and made != httpx.get(server.url + "/health").headers["x-request-id"]
    assert httpx.get(server.url + "/health", headers={"X-Request-Id": "x" * 200}).headers["x-request-id"] != "x" * 200
    time.sleep(0.5)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    mine = [rec for rec in lines if rec.get("request_id") == "trace-42"]
    assert mine and all({"ts", "level", "logger", "message"} <= set(rec) for rec in mine)
    assert any("POST /v1/completions" in rec["message"] for rec in mine)  # uvicorn's access line
    assert any(rec.get("request_id") == made for rec in lines)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed "
                    "(make services installs it)")
def test_a_real_prometheus_scrapes_the_server(srv, tmp_path):
    server, _ = srv
    target = server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: svdserve, static_configs: [{{targets: ['{target}']}}]}}]\n")
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(got) < 3:
            time.sleep(1)
            for q in ("up", "vllm:num_requests_running", "vllm:lora_requests_info"):
                try:
                    res = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}).json()
                except httpx.HTTPError:
                    continue
                if res.get("status") == "success" and res["data"]["result"]:
                    got[q] = res["data"]["result"][0]
        assert got["up"]["value"][1] == "1"
        assert got["vllm:num_requests_running"]["metric"]["job"] == "svdserve"
        assert got["vllm:lora_requests_info"]["metric"]["max_lora"] == "64"
    finally:
        proc.terminate()
        proc.wait(30)
