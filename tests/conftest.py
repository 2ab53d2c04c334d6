"""Fixtures shared by the whole suite.

* `server`: the REAL server on the default model, started once per session as a subprocess
  (`python -m server --port <free> --store <tmp> --cache-dir <repo>/.cache/factors`), ready when /health answers.
* `tiny_chat_base`: a tiny random Llama with a character-level tokenizer and a chat template — a BaseModel that
  the server, the engine and the runtime accept like the real one, built in well under a second.
* the native OSoRA CPU kernel (adapters/kernels) is built once at the start of the session where a C++ compiler
  is present (~30 s on a fresh machine), so no server a test starts spends its start-up timeout building it.
* `postgres`: a throwaway PostgreSQL server (tests/postgres.py), started once per session: `.url` is
  `postgresql+psycopg://postgres@127.0.0.1:PORT/svdserve`, `.new_database(name=None)` the URL of a fresh empty
  database. Skipped where the server binaries are missing (`make services` installs them); under CI, an error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.postgres import PostgresServer, find_pg_bin

REPO = Path(__file__).resolve().parents[1]
FACTOR_CACHE = REPO / ".cache" / "factors"
SERVER_START_TIMEOUT = float(os.environ.get("SVDSERVE_TEST_START_TIMEOUT", "600"))
# small enough that the "body too large" test sends little, large enough for rank-8 LoRA files
TEST_MAX_ADAPTER_BYTES = 16 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    store: Path
    cache_dir: Path
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session", autouse=True)
def native_kernel() -> None:
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")):
        from adapters import kernels

        kernels.osora_apply()  # built (or loaded) here; tests/adapters/test_kernels.py asserts it works


def _clean_env() -> dict[str, str]:
    # the server refuses unknown SVDSERVE_ variables; the test harness's own must not reach it
    return {k: v for k, v in os.environ.items() if not k.startswith("SVDSERVE_")}


def start_server(tmp: Path, *extra: str) -> ServerProcess:
    """Start `python -m server` on a free port and wait until /health answers 200."""
    port = free_port()
    store, log = tmp / "store", tmp / "server.log"
    # float32 unless a test asks otherwise: the references the answers are checked against are float32 (the
    # server's --dtype auto picks bfloat16 on CPUs with native bf16, where tokens match up to near-ties only)
    dtype = () if "--dtype" in extra else ("--dtype", "float32")
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--store", str(store),
           "--cache-dir", str(FACTOR_CACHE), *dtype, *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
    srv = ServerProcess(f"http://127.0.0.1:{port}", store, FACTOR_CACHE, proc, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(srv)
    raise RuntimeError(f"server not healthy after {SERVER_START_TIMEOUT:.0f} s:\n{srv.log_tail()}")


def stop_server(srv: ServerProcess) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGINT)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server on the default model, shared by every end-to-end test of the session."""
    srv = start_server(tmp_path_factory.mktemp("server"), "--max-adapter-bytes", str(TEST_MAX_ADAPTER_BYTES),
                       "--max-batch-size", "32")
    yield srv
    stop_server(srv)


# ---- a tiny model with a tokenizer ---------------------------------------------------------------------

TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(0xC0 + i) for i in range(29)]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_tokenizer():
    """Character-level tokenizer: ids 0 <pad>, 1 <eos>, 2 <unk>, then 125 characters (128 in all)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {ch: i + 3 for i, ch in enumerate(TINY_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_chat_model(seed: int = 0):
    """A BaseModel: random 2-layer Llama (hidden 64, vocab 128) with `tiny_tokenizer()`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.base_model import from_module

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return from_module(model, tokenizer, name="tiny-llama")


@pytest.fixture
def tiny_chat_base():
    return tiny_chat_model()


# ---- a throwaway PostgreSQL server ---------------------------------------------------------------------

def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own for the session; `.url` is the `svdserve` database, `.new_database()` a
    fresh empty one per test that needs it."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if _in_ci():
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: CI must install them "
                        "(`make services` installs Debian's postgresql-15)", pytrace=False)
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql-15")
    with PostgresServer(bin_dir) as pg:
        yield pg


# ---- a throwaway S3 server ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server (tests/s3server.py) for the session; `.env` holds the AWS_* variables that
    point a client at it, `.new_bucket()` makes a fresh bucket."""
    from tests.s3server import S3Server

    with S3Server() as s3:
        yield s3


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS_* environment of the test S3 server, set in this process for the test."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """`tiny_chat_model()` saved as a Hugging Face directory, for real server processes (`--model DIR`) that
    need no real model (start in seconds)."""
    path = tmp_path_factory.mktemp("tiny-model")
    base = tiny_chat_model()
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    return str(path)


# ---- memory ------------------------------------------------------------------------------------------------

class PeakRss:
    """The peak resident memory of process `pid` (default: this one) while the `with` block runs, sampled
    every `interval_s` in a thread: `.start` at entry, `.peak` the highest seen (final after exit)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.01):
        import psutil

        self._proc, self._interval = psutil.Process(pid), interval_s
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = None

    def __enter__(self) -> PeakRss:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
