"""The S3 store against a real S3 server (moto's, on loopback) and a real database (SQLite; PostgreSQL where
replicas race): objects immutable and named by sha256, the index in the database, two stores ("replicas")
sharing both see each other's publishes at once, quotas and validation as the local store, the disk cache
bounded, a corrupted object refused."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from adapters.file import AdapterFormatError, BaseSpec
from adapters.synthetic import random_adapter
from server.store import (AdapterNotFound, InvalidAdapterId, StorageLimit, StorageQuotaExceeded, StoreNotWritable,
                          StoreUnavailable, open_store)
from server.store.s3 import S3Store
from server.tenancy.database import Database, sqlite_url

R_MAX = 16


def adapter_bytes(model, seed: int, rank: int = 4) -> bytes:
    spec, factors = model
    return random_adapter("osora", spec, factors, rank=rank, seed=seed).to_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def db(tmp_path):
    d = Database(sqlite_url(str(tmp_path / "db.sqlite")))
    d.migrate()
    yield d
    d.dispose()


@pytest.fixture
def bucket(s3_env):
    return s3_env.new_bucket()


def replica(model, db, bucket, cache_dir, prefix="fleet/a", **kw) -> S3Store:
    store = open_store(f"s3://{bucket}/{prefix}", model[0], engine=db.engine, cache_dir=str(cache_dir), **kw)
    assert isinstance(store, S3Store)
    return store


def objects(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def test_objects_are_named_by_sha256_and_the_index_is_in_the_database(model, db, bucket, s3_env, tmp_path):
    s = replica(model, db, bucket, tmp_path / "cache")
    v1 = adapter_bytes(model, 1)
    info, created = s.put("alice/a", v1)
    assert created and info.sha256 == sha(v1) and info.bytes == len(v1) and info.name == "alice/a"
    assert s.put("alice/a", v1)[1] is False
    assert s.put("bob/same", v1)[1] is True  # the same bytes: one object
    assert objects(s3_env, bucket) == [f"fleet/a/objects/{sha(v1)}"]
    assert s.get("alice/a").version == sha(v1) and s.info("alice/a") == info
    assert [i.name for i in s.list()] == ["alice/a", "bob/same"] and s.list("alice") == [info]
    assert s.tenants() == ["alice", "bob"] and s.ids("alice") == ["a"] and s.exists("alice/a")
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT tenant, adapter_id, sha256 FROM adapter_versions ORDER BY tenant").all()
    assert [tuple(r) for r in rows] == [("alice", "a", sha(v1)), ("bob", "same", sha(v1))]
    s.delete("alice/a")
    assert not s.exists("alice/a") and s.list("alice") == []
    for call in (s.get, s.info, s.delete):
        with pytest.raises(AdapterNotFound):
            call("alice/a")
    assert s.unreferenced_objects() == []  # bob/same still names it
    s.delete("bob/same")
    assert s.unreferenced_objects() == [sha(v1)]
    assert os.listdir(s.disk.uploads) == []


def test_two_replicas_see_each_others_publishes_at_once(model, db, bucket, tmp_path):
    a = replica(model, db, bucket, tmp_path / "a")
    b = replica(model, db, bucket, tmp_path / "b")
    v1, v2 = adapter_bytes(model, 1), adapter_bytes(model, 2)
    with pytest.raises(AdapterNotFound):
        b.get("t/x")
    a.put("t/x", v1)
    got = b.get("t/x")  # downloaded into b's own disk cache
    assert got.version == sha(v1) and b.counters.downloads == 1 and os.listdir(b.disk.objects) == [sha(v1)]
    assert b.get("t/x") is got and b.counters.hits == 1  # parsed once
    a.put("t/x", v2)  # replace through a: b's next lookup resolves the new version
    assert b.get("t/x").version == sha(v2) and b.info("t/x").sha256 == sha(v2)
    a.delete("t/x")  # delete through a: gone for b at once, though b holds it parsed and on disk
    assert not b.exists("t/x")
    with pytest.raises(AdapterNotFound):
        b.get("t/x")
    assert [i.name for i in b.list()] == []


def test_validation_quotas_and_names_as_the_local_store(model, db, bucket, s3_env, tmp_path):
    s = replica(model, db, bucket, tmp_path / "cache")
    with pytest.raises(AdapterFormatError):
        s.put("t/bad", b"not a safetensors file at all")
    with pytest.raises(InvalidAdapterId):
        s.put("t/../x", adapter_bytes(model, 1))
    other = BaseSpec(shapes=model[0].shapes, r_max=R_MAX, fingerprint="another-model")
    with pytest.raises(AdapterFormatError):  # rank beyond r_max
        s.put("t/big", random_adapter("osora", other, model[1], rank=R_MAX, seed=1).to_bytes()[:64])
    assert objects(s3_env, bucket) == [] and s.list() == []
    v1, v2, v3, v4 = (adapter_bytes(model, i) for i in (1, 2, 3, 4))
    two = StorageLimit(max_adapters=2)
    s.put("t/a", v1, two)
    s.put("t/b", v2, two)
    s.put("t/a", v3, two)  # a replacement is not one more
    with pytest.raises(StorageQuotaExceeded) as e:
        s.put("t/c", v4, two)
    assert e.value.param == "max_adapters"
    with pytest.raises(StorageQuotaExceeded) as e:
        s.check_quota("t/c", 1, two)
    with pytest.raises(StorageQuotaExceeded) as e:
        s.put("u/a", v4, StorageLimit(max_bytes=len(v4) - 1))
    assert e.value.param == "max_storage_bytes" and not s.exists("u/a")
    # v1 (a's first version), v2, v3; v4 was refused before its object was written
    assert objects(s3_env, bucket) == sorted(f"fleet/a/objects/{sha(v)}" for v in (v1, v2, v3))


def test_concurrent_uploads_cannot_both_pass_the_quota_on_postgres(model, postgres, bucket, tmp_path):
    db = Database(postgres.new_database())
    db.migrate()
    try:
        stores = [replica(model, db, bucket, tmp_path / f"r{i}") for i in range(2)]
        data = [adapter_bytes(model, i) for i in range(8)]
        outcomes: list[str] = []

        def upload(i: int) -> None:
            try:
                stores[i % 2].put(f"t/a{i}", data[i], StorageLimit(max_adapters=3))
                outcomes.append("ok")
            except StorageQuotaExceeded:
                outcomes.append("quota")

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ok"] * 3 + ["quota"] * 5
        assert len(stores[0].ids("t")) == 3
    finally:
        db.dispose()


def test_the_disk_cache_is_bounded_and_refetches(model, db, bucket, tmp_path):
    writer = replica(model, db, bucket, tmp_path / "w")
    data = [adapter_bytes(model, i) for i in range(4)]
    for i, d in enumerate(data):
        writer.put(f"t/a{i}", d)
    size = len(data[0])
    r = replica(model, db, bucket, tmp_path / "r", cache_bytes=2 * size, parsed_cache_bytes=0)
    for i in range(4):
        assert r.get(f"t/a{i}").version == sha(data[i])
        assert r.disk.bytes <= 2 * size and len(os.listdir(r.disk.objects)) <= 2
    assert r.counters.downloads == 4 and r.disk.evictions == 2
    assert r.get("t/a3").version == sha(data[3]) and r.counters.disk_hits == 1  # still on disk
    assert r.get("t/a0").version == sha(data[0]) and r.counters.downloads == 5  # evicted: fetched again
    r2 = replica(model, db, bucket, tmp_path / "r", cache_bytes=2 * size)  # a restart keeps the cache
    assert r2.get("t/a0").version == sha(data[0]) and r2.counters.downloads == 0


def test_a_corrupted_object_is_refused_and_a_missing_bucket_named(model, db, bucket, s3_env, tmp_path):
    writer = replica(model, db, bucket, tmp_path / "w")
    v1 = adapter_bytes(model, 1)
    writer.put("t/a", v1)
    s3_env.client().put_object(Bucket=bucket, Key=f"fleet/a/objects/{sha(v1)}", Body=v1[:-1] + b"\0")
    reader = replica(model, db, bucket, tmp_path / "r")
    with pytest.raises(StoreUnavailable, match="does not match its sha256"):
        reader.get("t/a")
    assert os.listdir(reader.disk.objects) == [] and os.listdir(reader.disk.uploads) == []
    s3_env.client().delete_object(Bucket=bucket, Key=f"fleet/a/objects/{sha(v1)}")
    with pytest.raises(StoreUnavailable, match="lacks the adapter object"):
        reader.get("t/a")
    with pytest.raises(StoreNotWritable, match="no-such-bucket"):
        replica(model, db, "no-such-bucket", tmp_path / "x")
