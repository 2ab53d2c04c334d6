"""The server's memory is bounded by its settings, not by the size of the store or of what clients send: on the
default model, its RSS stays within a stated bound while the store holds 2 GB of adapters (written by another
process while it runs, as a replica sharing the store would) and while 8 clients upload 200 MB bodies at
once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, PeakRss, start_server, stop_server

pytestmark = pytest.mark.e2e
MiB = 2**20
STORE_BYTES = 2 * 2**30
RSS_BOUND = 96 * MiB  # over the RSS of the same server with an empty store, idle


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _upload(url: str, results: list, i: int) -> None:
    def body():
        chunk = b"\0" * MiB
        for _ in range(200):  # 200 MB, no Content-Length: the server must stop reading at its limit
            yield chunk

    try:
        r = httpx.put(f"{url}/adapters/big-{i}", content=body(), timeout=120)
        results.append(r.status_code)
    except httpx.HTTPError as exc:  # the server answered 413 and closed while we were still sending
        results.append(type(exc).__name__)


def test_rss_is_bounded_with_a_2gb_store_and_8_concurrent_200mb_uploads(tmp_path):
    srv = start_server(tmp_path, "--max-adapter-bytes", str(16 * MiB),
                       "--max-upload-bytes-in-flight", str(256 * MiB))
    try:
        pid = srv.proc.pid
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            c.get("/v1/models")
            base = rss(pid)
            data = (REPO / "examples" / "json.safetensors").read_bytes()
            n = STORE_BYTES // len(data) + 1
            d = srv.store / "default"
            for i in range(n):
                (d / f"m{i:05d}.safetensors").write_bytes(data)
            models = c.get("/v1/models").json()["data"]
            assert len(models) == n + 1
            assert c.get("/adapters/m00042").json()["bytes"] == len(data)
            listed = rss(pid)
            assert listed - base < RSS_BOUND, f"{(listed - base) / MiB:.0f} MiB more with a 2 GB store"

            results: list = []
            clients = [threading.Thread(target=_upload, args=(srv.url, results, i)) for i in range(8)]
            with PeakRss(pid, interval_s=0.05) as memory:
                for t in clients:
                    t.start()
                for t in clients:
                    t.join(180)
            assert len(results) == 8 and all(r in (413, "WriteError", "RemoteProtocolError", "ReadError")
                                             for r in results), results
            peak = max(memory.peak, listed)
            assert peak - base < RSS_BOUND, f"peak {(peak - base) / MiB:.0f} MiB over the idle server"
            assert not list(d.glob(".upload-*")) and c.get("/health").status_code == 200
            print(f"RSS: idle {base / MiB:.0f} MiB; 2 GB store listed +{(listed - base) / MiB:.1f} MiB; "
                  f"8 x 200 MB uploads peak +{(peak - base) / MiB:.1f} MiB")
    finally:
        stop_server(srv)
