"""Helpers for the end-to-end API tests: adapters made for the server's base model, and an in-process
reference — the base model with an adapter merged densely (W0 + ΔW from the method's plain-torch
`dense_delta`), decoded greedily — that the server's answers are checked against."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import torch

from adapters.base_model import BaseModel, load_base_model
from adapters.factors import LayerFactors, load_or_build_factors
from adapters.file import Adapter, BaseSpec
from adapters.methods import get_method
from adapters.synthetic import random_adapter
from tests.conftest import FACTOR_CACHE, ServerProcess

R_MAX = 64  # the server's default --max-rank
PROMPT = "The capital of France is"


@dataclass
class Reference:
    base: BaseModel
    factors: dict[str, LayerFactors]
    spec: BaseSpec

    def adapter(self, method: str, seed: int, rank: int = 8, **kw) -> Adapter:
        return random_adapter(method, self.spec, self.factors, rank=rank, seed=seed, **kw)

    def encode(self, text: str) -> list[int]:
        return self.base.tokenizer.encode(text)

    @contextmanager
    def merged(self, adapter: Adapter | None):
        """The base model with W0 + ΔW written into the adapter's layers, restored afterwards."""
        saved = {}
        try:
            if adapter is not None:
                m = get_method(adapter.method)
                glob = {n: t.float() for n, t in adapter.glob.items()}
                for name, p in adapter.layers.items():
                    w = self.base.targets[name].weight
                    saved[name] = w.detach().clone()
                    delta = m.dense_delta({k: v.float() for k, v in p.items()}, self.factors[name], adapter.rank,
                                          adapter.scale, glob)
                    w.data += delta
            yield self.base.model
        finally:
            for name, w0 in saved.items():
                self.base.targets[name].weight.data.copy_(w0)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n_tokens: int, adapter: Adapter | None = None) -> list[int]:
        """`n_tokens` greedy tokens (EOS ignored, as the requests in these tests ask)."""
        with self.merged(adapter) as model:
            ids, out = torch.tensor([prompt_ids]), []
            for _ in range(n_tokens):
                token = int(model(ids).logits[0, -1].argmax())
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out


@pytest.fixture(scope="session")
def reference(server: ServerProcess) -> Reference:
    """The default model in-process, with the factors the server uses (its cache, built by now)."""
    base = load_base_model()
    factors = load_or_build_factors(base.targets, base.fingerprint, R_MAX, str(FACTOR_CACHE), progress=False)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    health = httpx.get(server.url + "/health").json()
    assert health["fingerprint"] == base.fingerprint
    return Reference(base, factors, spec)


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def complete(client: httpx.Client, prompt: str | list[int], max_tokens: int = 8, **body) -> dict:
    """A greedy completion with EOS ignored; returns the response JSON (asserting a 200)."""
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines) -> list[dict | str]:
    """Parse `data: ...` lines of a server-sent event stream; `[DONE]` stays a string."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def upload(client: httpx.Client, adapter_id: str, adapter: Adapter) -> httpx.Response:
    return client.put(f"/adapters/{adapter_id}", content=adapter.to_bytes())
