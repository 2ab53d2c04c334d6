"""Fixtures for the tenancy tests: a database URL on SQLite and on PostgreSQL (the suite's own server),
and an in-process app on a tiny random model with an admin key, over either."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter
from server.app import create_app
from server.config import Settings, build_config
from tests.conftest import tiny_chat_model

ADMIN_KEY = "sk-svd-admin-key-for-tests-only-0123456789"
R_MAX = 16


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/tenants.db"
    return request.getfixturevalue("postgres").new_database()


@dataclass
class TinyServer:
    client: TestClient
    spec: BaseSpec
    factors: dict
    store: str

    def adapter_bytes(self, seed: int, method: str = "osora", rank: int = 4) -> bytes:
        return random_adapter(method, self.spec, self.factors, rank=rank, seed=seed).to_bytes()

    def as_admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def tenant(self, name: str, quota: dict | None = None, weight: int = 1) -> dict[str, str]:
        """Create a tenant and a key; returns the headers that authenticate as it."""
        r = self.client.post("/admin/tenants", json={"name": name, "quota": quota, "weight": weight},
                             headers=self.as_admin())
        assert r.status_code == 201, r.text
        r = self.client.post(f"/admin/tenants/{name}/keys", json={}, headers=self.as_admin())
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}


def tiny_server(store: str, database_url: str, **settings) -> tuple[TestClient, object, dict]:
    """An app (not yet started: enter the client) on a tiny random model; `settings` as Settings fields."""
    base = tiny_chat_model()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    model = AdaptedModel(base, factors, n_slots=9)
    defaults = dict(max_rank=R_MAX, device="cpu", max_resident_adapters=8, max_model_len=96,
                    max_adapter_bytes=65536)
    config = build_config(Settings(store=store, database_url=database_url, **(defaults | settings)))
    return TestClient(create_app(config, model=model), raise_server_exceptions=False), base, factors


@pytest.fixture
def tiny(tmp_path, db_url):
    """The app with an admin key, on a fresh store and a fresh database of each kind."""
    client, base, factors = tiny_server(str(tmp_path / "store"), db_url, admin_key=ADMIN_KEY)
    spec = BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint)
    with client:
        yield TinyServer(client, spec, factors, str(tmp_path / "store"))
