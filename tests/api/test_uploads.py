"""Adapter uploads over real HTTP, in-process (uvicorn in a thread on a tiny random model, seconds): bodies
stream to a temporary file chunk by chunk, so memory stays flat however much is sent; 413 while streaming a
body without Content-Length; 503 + Retry-After past --max-upload-bytes-in-flight; 408 for a stalled body; a
full disk is a 507 with the old version still served; listing reads the index; nothing refused leaves a trace.

(Starlette's TestClient reads a whole request body before the app sees it, so it cannot show streaming,
stalls or concurrency: these tests talk to a real server over loopback.)"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

import server.store.local as store_mod  # the local backend: its hashing, parsing and writes
from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter
from server.app import create_app
from server.config import Settings, build_config
from tests.conftest import PeakRss, tiny_chat_model

R_MAX = 16
MiB = 2**20


@dataclass
class Live:
    url: str
    app: object
    store: str
    spec: BaseSpec
    factors: dict

    def adapter(self, seed: int, method: str = "osora", rank: int = 4) -> bytes:
        return random_adapter(method, self.spec, self.factors, rank=rank, seed=seed).to_bytes()

    def temp_files(self) -> list[str]:
        return [os.path.join(d, n) for d, _, names in os.walk(self.store) for n in names if n.endswith(".tmp")]

    def in_flight(self) -> int:
        budget = getattr(self.app.state, "upload_budget", None)
        return 0 if budget is None else budget.used


@contextmanager
def live_server(tmp_path, **settings) -> Iterator[Live]:
    """The app on a tiny random model, served by uvicorn on a loopback port in a thread (open mode)."""
    base = tiny_chat_model()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    store = str(tmp_path / "store")
    config = build_config(Settings(**{"store": store, "max_rank": R_MAX, "device": "cpu", "max_resident_adapters": 4,
                                      "max_model_len": 96, "database_url": f"sqlite:///{tmp_path}/tenants.db",
                                      "max_adapter_bytes": 65536, **settings}))
    app = create_app(config, model=AdaptedModel(base, factors, n_slots=5))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app, store,
                   BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint), factors)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def put(live: Live, name: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=timeout) as c:
        return c.put(f"/adapters/{name}", content=body, headers=headers)


def chunks(total: int, size: int = 256 * 1024, pause: float = 0.0) -> Iterator[bytes]:
    """`total` bytes in chunks of one shared buffer (the client holds no more than one chunk)."""
    block = b"\0" * size
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block if n == size else block[:n]
        sent += n
        if pause:
            time.sleep(pause)


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


def test_a_streamed_upload_is_stored_whole_and_listed_from_the_index(tmp_path, monkeypatch):
    with live_server(tmp_path) as live:
        data = live.adapter(1, method="loraxs")
        r = put(live, "a", (data[i:i + 700] for i in range(0, len(data), 700)))  # chunked, no Content-Length
        assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(data).hexdigest(), r.text
        assert put(live, "b", live.adapter(2)).status_code == 201  # with Content-Length
        assert live.temp_files() == [] and live.in_flight() == 0

        def refuse(*args, **kw):
            raise AssertionError("listing parsed an adapter")

        monkeypatch.setattr(store_mod, "parse_adapter", refuse)
        with httpx.Client(base_url=live.url) as c:
            assert [a["id"] for a in c.get("/adapters").json()["data"]] == ["a", "b"]
            assert [m["id"] for m in c.get("/v1/models").json()["data"]][1:] == ["a", "b"]
            assert c.get("/adapters/a").json()["method"] == "loraxs"


def test_an_oversized_body_without_content_length_is_413_while_streaming(tmp_path):
    with live_server(tmp_path) as live:
        keep = live.adapter(1)
        assert put(live, "x", keep).status_code == 201
        sent = []

        def body():
            for c in chunks(64 * 65536, size=16384):
                sent.append(len(c))
                yield c

        err = error(put(live, "x", body()), 413, "payload_too_large")
        assert "65536" in err["message"] and "--max-adapter-bytes" in err["message"]
        assert sum(sent) < 64 * 65536  # refused while the client was still sending
        assert live.temp_files() == [] and live.in_flight() == 0
        with httpx.Client(base_url=live.url) as c:
            assert c.get("/adapters/x").json()["sha256"] == hashlib.sha256(keep).hexdigest()
        # declared too large: refused before any of it is read
        err = error(put(live, "y", b"\0" * 70000), 413, "payload_too_large")
        assert "70000" in err["message"]


def test_uploads_beyond_the_in_flight_cap_are_503_with_retry_after(tmp_path):
    cap = 10_000
    with live_server(tmp_path, max_upload_bytes_in_flight=cap) as live:
        first, second = live.adapter(1, rank=2), live.adapter(2, rank=2)
        assert cap / 2 < len(first) == len(second) <= cap, len(first)  # one fits, two do not
        release = threading.Event()

        def held():  # sends half, then waits: the upload stays in flight
            yield first[: len(first) // 2]
            release.wait(30)
            yield first[len(first) // 2:]

        result = {}
        holder = threading.Thread(target=lambda: result.update(
            r=put(live, "one", held(), headers={"Content-Length": str(len(first))})))
        holder.start()
        try:
            wait_until(lambda: live.in_flight() == len(first))
            r = put(live, "two", second)
            err = error(r, 503, "uploads_busy")
            assert r.headers["Retry-After"] == "2" and "--max-upload-bytes-in-flight" in err["message"]
            # without Content-Length: refused as its bytes arrive past the cap
            error(put(live, "two", chunks(len(second), size=512)), 503, "uploads_busy")
        finally:
            release.set()
            holder.join(30)
        assert result["r"].status_code == 201, result["r"].text
        assert live.in_flight() == 0 and live.temp_files() == []
        assert put(live, "two", second).status_code == 201  # the retry passes
        # a single upload larger than the whole cap could never pass: 413, not a retry forever
        err = error(put(live, "big", chunks(cap + 2000, size=1024)), 413, "payload_too_large")
        assert "--max-upload-bytes-in-flight" in err["message"]
        with httpx.Client(base_url=live.url) as c:
            assert [a["id"] for a in c.get("/adapters").json()["data"]] == ["one", "two"]


def test_a_stalled_upload_is_408_and_leaves_nothing(tmp_path):
    with live_server(tmp_path, upload_timeout_seconds=0.5) as live:
        v1, v2 = live.adapter(1), live.adapter(2)
        assert put(live, "x", v1).status_code == 201

        def stalls():
            yield v2[:1000]
            time.sleep(1.5)
            yield v2[1000:]

        started = time.monotonic()
        err = error(put(live, "x", stalls()), 408, "request_timeout")
        assert "--upload-timeout-seconds" in err["message"] and time.monotonic() - started < 5
        assert live.temp_files() == [] and live.in_flight() == 0
        with httpx.Client(base_url=live.url) as c:
            assert c.get("/adapters/x").json()["sha256"] == hashlib.sha256(v1).hexdigest()


def test_a_client_that_goes_away_mid_upload_leaves_nothing(tmp_path):
    with live_server(tmp_path) as live:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"PUT /adapters/x HTTP/1.1\r\nHost: test\r\nContent-Length: 50000\r\n\r\n" + b"\0" * 20000)
            wait_until(lambda: live.in_flight() == 50000)
        wait_until(lambda: live.in_flight() == 0 and live.temp_files() == [])
        with httpx.Client(base_url=live.url) as c:
            assert c.get("/adapters").json()["data"] == []


def test_a_full_disk_is_507_and_the_old_version_is_still_served(tmp_path, monkeypatch):
    with live_server(tmp_path) as live:
        v1, v2 = live.adapter(1), live.adapter(2, method="loraxs")
        assert put(live, "x", v1).status_code == 201
        greedy = {"prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "model": "x"}
        with httpx.Client(base_url=live.url, timeout=60) as c:
            before = c.post("/v1/completions", json=greedy).json()["choices"][0]["text"]

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(store_mod, "_fsync", full)
        err = error(put(live, "x", v2), 507, "insufficient_storage")
        assert "disk is full" in err["message"]
        monkeypatch.undo()
        assert live.temp_files() == [] and live.in_flight() == 0
        with httpx.Client(base_url=live.url, timeout=60) as c:
            info = c.get("/adapters/x").json()
            assert info["sha256"] == hashlib.sha256(v1).hexdigest() and info["method"] == "osora"
            assert c.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == before
        assert put(live, "x", v2).status_code == 200  # space again: the replacement goes through


def test_memory_stays_flat_while_clients_stream_more_than_the_limit(tmp_path):
    """Four clients each send 48 MiB without Content-Length against a 32 MiB limit: the server takes 32 MiB
    from each (128 MiB in all) to disk and refuses the rest. Buffering the bodies in memory would add at least
    128 MiB to the process; streaming adds about 12 MiB (clients, threads and 256 KiB write batches
    included), and the test allows 24."""
    limit, clients, body = 32 * MiB, 4, 48 * MiB
    with live_server(tmp_path, max_adapter_bytes=limit) as live:
        assert put(live, "warm", live.adapter(1)).status_code == 201  # threads, buffers, code paths warmed up
        results, sent = [None] * clients, [0] * clients

        def client(i):
            def counted():
                for c in chunks(body, size=256 * 1024):
                    sent[i] += len(c)
                    yield c

            results[i] = put(live, f"big{i}", counted())

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.monotonic()
        with PeakRss(interval_s=0.005) as memory:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        elapsed = time.monotonic() - started
        grown = memory.peak - memory.start
        print(f"\n{clients} x {body // MiB} MiB sent, {clients * limit // MiB} MiB received in {elapsed:.1f} s; "
              f"peak RSS growth {grown / MiB:.1f} MiB")
        assert all(r.status_code == 413 for r in results), [r.text for r in results]
        assert all(limit < n < body for n in sent), sent  # each read past the limit, then cut off
        assert grown < 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"  # measured ~12 MiB; buffering: >= 128
        assert live.temp_files() == [] and live.in_flight() == 0


def test_a_multipart_or_mangled_form_upload_says_to_use_data_binary(tmp_path):
    from tests.tenancy.conftest import tiny_server

    client, _, _ = tiny_server(str(tmp_path / "store"), f"sqlite:///{tmp_path}/db.sqlite")
    with client as c:
        r = c.put("/adapters/x", files={"file": ("a.safetensors", b"\x08\x00" * 40)})  # curl -F
        assert r.status_code == 400 and "--data-binary" in r.json()["error"]["message"]
        r = c.put("/adapters/x", content=b"garbage without newlines",  # curl -d
                  headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400 and "-d strips newlines" in r.json()["error"]["message"]
        assert c.get("/adapters").json()["data"] == []
