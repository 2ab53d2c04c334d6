"""A fleet for the tests: `python -m server fleet --replicas 2` on a tiny random model saved as a local model
directory, a local Ray cluster, the suite's PostgreSQL as the shared tenants' database and an S3 bucket of the
suite's S3 server as the shared adapter store.
Started once per module and stopped at its end (the launcher removes the application and stops the cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, _clean_env, free_port, tiny_chat_model

ADMIN_KEY = "sk-svd-fleet-admin-key-for-tests-only-0123"
R_MAX = 16
START_TIMEOUT_S = float(os.environ.get("SVDSERVE_TEST_START_TIMEOUT", "600"))


@dataclass
class Fleet:
    url: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path
    cache_dir: Path
    spec: object
    factors: dict

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def adapter_bytes(self, seed: int, method: str = "osora", rank: int = 8) -> bytes:
        """A strong random adapter: its logprobs differ from the base model's and other seeds' by tenths."""
        from adapters.synthetic import random_adapter

        return random_adapter(method, self.spec, self.factors, rank=rank, seed=seed, strength=3.0).to_bytes()

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def replicas(self) -> list[dict]:
        r = httpx.get(self.url + "/fleet/replicas", headers=self.admin(), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["replicas"]


def save_tiny_model(directory: Path, cache_dir: Path) -> tuple[object, dict]:
    """The tiny chat model as a model directory the replicas load, its factors cached for them; returns the
    adapter spec and factors the tests build adapters from."""
    from adapters.base_model import load_base_model
    from adapters.factors import load_or_build_factors
    from adapters.file import BaseSpec

    tiny = tiny_chat_model()
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    base = load_base_model(str(directory))
    factors = load_or_build_factors(base.targets, base.fingerprint, R_MAX, str(cache_dir), progress=False)
    return BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint), factors


def start_fleet(tmp: Path, database_url: str, store: str, env: dict[str, str], *extra: str) -> Fleet:
    """`store`: a directory or s3://...; `env`: extra environment (the S3 server's AWS_* variables)."""
    model_dir, cache_dir, log = tmp / "tiny-llama", tmp / "factors", tmp / "fleet.log"
    spec, factors = save_tiny_model(model_dir, cache_dir)
    port = free_port()
    cmd = [sys.executable, "-m", "server", "fleet", "--replicas", "2", "--replica-cpus", "1", "--model", str(model_dir),
           "--cache-dir", str(cache_dir), "--store", store, "--store-cache-dir", str(tmp / "adapter-cache"),
           "--database-url", database_url, "--port", str(port), "--admin-key", ADMIN_KEY, "--max-rank", str(R_MAX),
           "--device", "cpu", "--max-model-len", "256", "--max-resident-adapters", "8", *extra]
    env = {k: v for k, v in _clean_env().items() if not k.startswith("AWS_")} | env | {"RAY_DEDUP_LOGS": "0"}
    with open(log, "wb") as out:  # its own session: the teardown can end every process it started
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    fleet = Fleet(f"http://127.0.0.1:{port}", proc, log, model_dir, cache_dir, spec, factors)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet exited with {proc.returncode}:\n{fleet.log_tail()}")
        try:
            if httpx.get(fleet.url + "/health", timeout=2).status_code == 200 and len(fleet.replicas()) == 2:
                return fleet
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(1)
    stop_fleet(fleet)
    raise RuntimeError(f"fleet not ready after {START_TIMEOUT_S:.0f} s:\n{fleet.log_tail()}")


def stop_fleet(fleet: Fleet) -> None:
    """SIGINT: the launcher shuts Ray Serve down and stops the local Ray cluster. Whatever is left of its
    process group after a minute is killed."""
    if fleet.proc.poll() is None:
        fleet.proc.send_signal(signal.SIGINT)
        try:
            fleet.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(fleet.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    fleet.proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres, s3_server) -> Iterator[Fleet]:
    """Two replicas of at most 2 running requests each (so a burst for one adapter spills to the other), on the
    fleet's shared state: the suite's PostgreSQL and an S3 bucket on its S3 server (moto), the adapter index in
    the database."""
    store = f"s3://{s3_server.new_bucket()}/fleet"
    f = start_fleet(tmp_path_factory.mktemp("fleet"), postgres.new_database(), store, s3_server.env,
                    "--max-batch-size", "2")
    yield f
    stop_fleet(f)
