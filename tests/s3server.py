"""A throwaway S3 server for the test suite: moto's standalone server (`python -m moto.server`, from the
`moto[server]` test extra) on a free loopback port, as its own process — the store talks to it over HTTP like
to any S3 endpoint.

    with S3Server() as s3:
        s3.env                  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
        s3.new_bucket()         # a fresh empty bucket, returns its name
        s3.client()             # a boto3 client on it (to look behind the store's back)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import httpx

START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="svdserve-moto-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "svdserve-test",
                "AWS_SECRET_ACCESS_KEY": "svdserve-test-secret", "AWS_REGION": "us-east-1"}

    def start(self) -> S3Server:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                httpx.get(self.url + "/moto-api/", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server not up after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-n:]

    def client(self):
        import boto3

        e = self.env
        return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"])

    def new_bucket(self) -> str:
        name = f"svdserve-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        try:
            os.unlink(self.log.name)
        except FileNotFoundError:
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
