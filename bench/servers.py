"""The servers under test in bench/serve_load.py, each started as a subprocess and stopped afterwards:
svdserve (`python -m server`), llama.cpp's `llama-server`, and `transformers serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cmd: list[str], health: str, log_path: Path, timeout: float = 600.0, env: dict | None = None):
    """Start `cmd`, wait until GET `health` answers 200, yield, then stop the process (and only it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        try:
            _wait_healthy(proc, health, timeout, log_path)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"no healthy answer from {url} within {timeout:.0f} s; see {log_path}")


def svdserve(port: int, store: Path, log_dir: Path, extra: list[str]):
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--store", str(store), "--log-level", "warning", *extra]
    return running(cmd, f"http://127.0.0.1:{port}/health", log_dir / "svdserve.log")


def llama_server(binary: str, gguf: str, port: int, slots: int, ctx_per_slot: int, loras: list[Path],
                 log_dir: Path, threads: int | None):
    """llama-server with `slots` parallel sequences; LoRAs loaded at scale 0, chosen per request."""
    cmd = [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
           "-c", str(slots * ctx_per_slot), "--no-webui"]
    if threads:
        cmd += ["-t", str(threads)]
    if loras:  # one comma-separated --lora (a repeated --lora keeps only the last)
        cmd += ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"]
    return running(cmd, f"http://127.0.0.1:{port}/health", log_dir / "llama-server.log")


def transformers_serve(model_dir: Path, port: int, log_dir: Path, dtype: str):
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", str(model_dir), "--continuous-batching", "--port", str(port), "--host", "127.0.0.1",
           "--device", "cpu", "--dtype", dtype]
    return running(cmd, f"http://127.0.0.1:{port}/health", log_dir / "transformers-serve.log")
