"""The server's life on the default model: a busy port fails at once, /health answers quickly while a
multi-megabyte prompt is being handled, and SIGTERM during 8 streams ends each with a last chunk carrying
`finish_reason` and `data: [DONE]` — no cut connection, no traceback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import FACTOR_CACHE, REPO, _clean_env, start_server

pytestmark = pytest.mark.e2e


def test_a_busy_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--store", str(tmp_path / "s"),
                            "--cache-dir", str(FACTOR_CACHE)], cwd=REPO, env=_clean_env(), capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr, r.stderr
    assert time.monotonic() - started < 30  # the model (tens of seconds) was never loaded


def test_a_kv_budget_below_one_sequence_is_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--store", str(tmp_path / "s"),
                        "--cache-dir", str(FACTOR_CACHE), "--kv-cache-memory", "1MB", "--max-model-len", "4096",
                        "--log-format", "text"], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "--kv-cache-memory 1MB" in lines[0] and "--max-model-len 4096" in lines[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_health_stays_fast_while_a_huge_prompt_is_handled(server):
    prompt = "word " * 700_000  # 3.5 MB of text: tokenized off the event loop
    result = {}

    def send():
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=300)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=send)
    t.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while t.is_alive() or len(latencies) < 20:
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    t.join()
    assert result["status"] == 400 and result["body"]["error"]["code"] == "context_length_exceeded"
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"


def _stream(url: str, out: dict, i: int, first: threading.Event) -> None:
    body = {"prompt": f"Story number {i}:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first.set()
    out[i] = events


def test_sigterm_during_8_streams_ends_each_with_finish_reason_and_done(tmp_path):
    srv = start_server(tmp_path, "--shutdown-grace-seconds", "1")
    out: dict[int, list[str]] = {}
    firsts = [threading.Event() for _ in range(8)]
    threads = [threading.Thread(target=_stream, args=(srv.url, out, i, firsts[i])) for i in range(8)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in firsts)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    for i in range(8):
        events = out[i]
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("abort", "length"), last
    log = srv.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log and '"level": "ERROR"' not in log, log[-3000:]


def test_kill_9_during_an_upload_leaves_no_temporary_file_after_the_next_start(tmp_path):
    srv = start_server(tmp_path)
    sent = threading.Event()

    def slow_body():
        for i in range(600):
            yield b"\0" * 65536
            if i == 20:
                sent.set()
            time.sleep(0.01)

    def upload():
        try:
            httpx.put(srv.url + "/adapters/half", content=slow_body(), timeout=60)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=upload)
    t.start()
    assert sent.wait(60)
    time.sleep(0.3)
    assert list((srv.store / "default").glob(".upload-*"))  # the upload is being written
    srv.proc.kill()
    srv.proc.wait()
    t.join(60)
    srv = start_server(tmp_path)
    try:
        assert not list(srv.store.rglob(".upload-*"))
        assert httpx.get(srv.url + "/adapters").json()["data"] == []
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(60)
