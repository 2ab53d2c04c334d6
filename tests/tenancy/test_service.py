"""The tenants' database on SQLite and PostgreSQL: migrations, keys, usage aggregation, and the operators'
command line (`python -m server tenants|keys|usage|audit`)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect

from server.cli import run
from server.tenancy.database import Database
from server.tenancy.quotas import Quota
from server.tenancy.service import Conflict, Invalid, NotFound, TenancyService
from tests.conftest import REPO


@pytest.fixture
def service(db_url):
    db = Database(db_url)
    db.migrate()
    yield TenancyService(db, Quota(requests_per_minute=60))
    db.dispose()


def test_migrations_create_the_schema_and_are_idempotent(db_url):
    db = Database(db_url)
    try:
        assert db.migrate() == db.migrate() == "0002"
        tables = set(inspect(db.engine).get_table_names())
        assert {"tenants", "api_keys", "public_adapters", "usage", "audit", "alembic_version"} <= tables
    finally:
        db.dispose()


def test_keys_authenticate_until_revoked_or_expired(service):
    service.create_tenant("acme", {"tokens_per_minute": 100}, 2, None)
    made = service.create_key("acme", None, None, None)
    p = service.authenticate(made["key"])
    assert (p.role, p.tenant, p.key_id, p.weight) == ("tenant", "acme", made["id"], 2)
    assert p.quota == Quota(requests_per_minute=60, tokens_per_minute=100)  # defaults under the tenant's own
    assert service.authenticate(made["key"] + "x") is None
    service.revoke_key(made["id"], None)
    assert service.authenticate(made["key"]) is None
    soon = service.create_key("acme", None, datetime.now(timezone.utc) - timedelta(seconds=1), None)
    assert service.authenticate(soon["key"]) is None
    admin = service.create_key(None, "ops", None, None)
    assert service.authenticate(admin["key"]).is_admin


def test_errors(service):
    service.create_tenant("acme", None, 1, None)
    for call, exc in [(lambda: service.create_tenant("acme", None, 1, None), Conflict),
                      (lambda: service.create_tenant("no/slash", None, 1, None), Invalid),
                      (lambda: service.get_tenant("nope"), NotFound),
                      (lambda: service.create_key("nope", None, None, None), NotFound),
                      (lambda: service.revoke_key("key_nope", None), NotFound),
                      (lambda: service.update_tenant("acme", {"max_adapters": "5"}, None, None), Invalid)]:
        with pytest.raises(exc):
            call()


def test_usage_is_summed_per_tenant_adapter_and_hour(service):
    t0 = datetime(2026, 12, 1, 10, 5, tzinfo=timezone.utc)
    for minutes, tenant, adapter, p, c in [(0, "a", None, 3, 4), (10, "a", None, 1, 1), (70, "a", None, 2, 2),
                                           (0, "a", "a/bot", 5, 5), (0, "b", None, 9, 9)]:
        service.record_usage(tenant, adapter, "k", p, c, at=t0 + timedelta(minutes=minutes))
    rows = service.usage(t0, t0 + timedelta(hours=2), "a")
    got = [(r["hour"][11:16], r["adapter"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows]
    assert got == [("10:00", None, 2, 4, 5), ("10:00", "a/bot", 1, 5, 5), ("11:00", None, 1, 2, 2)]
    assert len(service.usage(None, None, None)) == 4
    assert service.usage(t0 + timedelta(minutes=1), t0 + timedelta(minutes=60), "a")[0]["requests"] == 1


def test_command_line(db_url, capsys):
    base = ["--database-url", db_url]
    assert run(["tenants", "create", "acme", "--quota", '{"requests_per_minute": 5}', *base]) == 0
    assert run(["keys", "create", "--tenant", "acme", "--description", "ci", *base]) == 0
    out = capsys.readouterr().out
    assert '"key": "sk-svd-' in out
    key_id = out.split('"id": "')[-1].split('"')[0]
    assert run(["tenants", "list", *base]) == 0 and "acme" in capsys.readouterr().out
    assert run(["keys", "revoke", key_id, *base]) == 0
    assert run(["tenants", "create", "acme", *base]) == 1  # exists: an error, not a traceback
    assert run(["usage", "--since", "7d", *base]) == 0 and "total: 0 requests" in capsys.readouterr().out
    assert run(["audit", *base]) == 0 and "key.revoke" in capsys.readouterr().out


def test_command_line_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "tenants", "list", "--store", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "default" in r.stdout, r.stderr
    assert (tmp_path / "svdserve.db").exists()  # the server's default database: SQLite in the store
