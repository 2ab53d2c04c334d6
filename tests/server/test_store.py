"""The adapter store on its own (CPU, seconds): the index built from headers and sidecars (no hashing when the
sidecars are good, no tensor parsing for listing), changes made by another writer noticed, the LRU of parsed
adapters bounded in bytes, full disks (ENOSPC/EDQUOT injected) refused with the old version kept, crash
leftovers removed at start, and an unusable directory named."""

from __future__ import annotations

import errno
import hashlib
import os
import time
import types

import pytest

import server.store.local as store_mod  # the local backend: its hashing, parsing and writes
from adapters.file import AdapterFormatError, parse_adapter
from adapters.synthetic import random_adapter
from server.store import (SIDECAR, AdapterNotFound, AdapterStore, StorageLimit, StorageQuotaExceeded, StoreFull,
                          StoreNotWritable, adapter_nbytes, check_writable)


@pytest.fixture
def spec(model):
    return model[0]


def adapter_bytes(model, seed: int, method: str = "osora", rank: int = 4) -> bytes:
    spec, factors = model
    return random_adapter(method, spec, factors, rank=rank, seed=seed).to_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_files(root) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".tmp"))


@pytest.fixture
def count_hashes(monkeypatch):
    """How many sha256 objects the store makes (a namespace standing in for its `hashlib`)."""
    calls = []

    def sha256(*args):
        calls.append(1)
        return hashlib.sha256(*args)

    monkeypatch.setattr(store_mod, "hashlib", types.SimpleNamespace(sha256=sha256))
    return calls


@pytest.fixture
def no_parsing(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("parse_adapter called")

    def off():
        monkeypatch.setattr(store_mod, "parse_adapter", refuse)

    return off


def test_put_get_list_info_and_sidecar(tmp_path, model, spec):
    s = AdapterStore(str(tmp_path), spec)
    v1 = adapter_bytes(model, 1)
    info, created = s.put("a", v1)
    assert created and info.sha256 == sha(v1) and info.bytes == len(v1) and info.name == "default/a"
    assert s.put("a", v1)[1] is False
    assert s.get("a").version == sha(v1) and s.info("default/a") == info
    assert s.list() == [info] and s.list("default") == [info] and s.list("other") == []
    assert sorted(os.listdir(tmp_path / "default")) == ["a.safetensors", "a.safetensors" + SIDECAR]
    s.delete("a")
    assert os.listdir(tmp_path / "default") == [] and s.list() == []
    with pytest.raises(AdapterNotFound):
        s.get("a")
    with pytest.raises(AdapterNotFound):
        s.info("a")


def test_start_up_index_reads_sidecars_and_does_not_hash(tmp_path, model, spec, monkeypatch):
    s = AdapterStore(str(tmp_path), spec)
    blobs = {f"t{i}/a{j}": adapter_bytes(model, 10 * i + j, rank=2 + j) for i in range(2) for j in range(3)}
    for name, data in blobs.items():
        s.put(name, data)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(store_mod, "hashlib", types.SimpleNamespace(sha256=lambda *a: calls.append(1) or real(*a)))
    again = AdapterStore(str(tmp_path), spec)
    assert calls == []  # six adapters indexed, none hashed
    assert {i.name: i.sha256 for i in again.list()} == {n: sha(d) for n, d in blobs.items()}
    assert {i.name: i.rank for i in again.list()} == {n: 2 + int(n[-1]) for n in blobs}
    assert calls == []

    # sidecars lost (a store from before them): each file hashed once, the sidecars written again
    for name in blobs:
        os.unlink(tmp_path / (name + ".safetensors" + SIDECAR))
    AdapterStore(str(tmp_path), spec)
    assert len(calls) == len(blobs)
    calls.clear()
    AdapterStore(str(tmp_path), spec)
    assert calls == []

    # a stale sidecar (the file's mtime moved) is not trusted: that one file is hashed
    os.utime(tmp_path / "t0/a1.safetensors", ns=(0, 10**9))
    third = AdapterStore(str(tmp_path), spec)
    assert len(calls) == 1 and third.info("t0/a1").sha256 == sha(blobs["t0/a1"])


def test_listing_never_parses_tensors(tmp_path, model, spec, no_parsing):
    s = AdapterStore(str(tmp_path), spec)
    blobs = {f"a{i}": adapter_bytes(model, i, method=m) for i, m in enumerate(["osora", "loraxs", "lora"])}
    for name, data in blobs.items():
        s.put(name, data)
    (tmp_path / "default" / "junk.safetensors").write_bytes(b"not an adapter at all")
    other = random_adapter("osora", spec, model[1], rank=4, seed=9)
    other.base_fingerprint = "someone-else"
    (tmp_path / "default" / "foreign.safetensors").write_bytes(other.to_bytes())
    no_parsing()
    fresh = AdapterStore(str(tmp_path), spec)  # index from headers
    for st in (s, fresh):
        assert [(i.id, i.method, i.sha256) for i in st.list()] == [
            (n, m, sha(d))
            for (n, d), m in zip(blobs.items(), ["osora", "loraxs", "lora"])]
        assert st.info("a1").method == "loraxs"
        with pytest.raises(AdapterFormatError, match="not a safetensors file"):
            st.info("junk")
        with pytest.raises(AdapterFormatError, match="base_fingerprint"):
            st.info("foreign")
    with pytest.raises(AssertionError, match="parse_adapter called"):
        fresh.get("a0")  # get parses (on a miss): the guard is real


def test_get_notices_a_file_replaced_by_another_replica_or_edited_in_place(tmp_path, model, spec):
    a, b = AdapterStore(str(tmp_path), spec), AdapterStore(str(tmp_path), spec)
    v1, v2, v3 = adapter_bytes(model, 1), adapter_bytes(model, 2), adapter_bytes(model, 3, method="loraxs")
    a.put("x", v1)
    assert a.get("x").version == sha(v1)
    b.put("x", v2)  # the other replica: a rename over the file
    assert a.get("x").version == sha(v2) and a.info("x").sha256 == sha(v2) and a.list()[0].sha256 == sha(v2)

    # a tool that rewrites the file in place, same size, and puts the old mtime back: ctime still tells
    path = tmp_path / "default" / "x.safetensors"
    st = os.stat(path)
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
    assert len(v1) == len(v2)
    with open(path, "r+b") as f:
        f.write(v1)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.get("x").version == sha(v1) and a.info("x").sha256 == sha(v1)

    # a different method written without a sidecar: listing and get follow, hashing that file only
    with open(path, "wb") as f:
        f.write(v3)
    assert [(i.method, i.sha256) for i in a.list()] == [("loraxs", sha(v3))]
    assert a.get("x").adapter.method == "loraxs"

    os.unlink(path)
    with pytest.raises(AdapterNotFound):
        a.get("x")
    assert a.list() == []


def test_parsed_adapters_are_an_lru_bounded_in_bytes(tmp_path, model, spec, monkeypatch):
    blobs = {n: adapter_bytes(model, i) for i, n in enumerate("abcd")}
    one = adapter_nbytes(parse_adapter(blobs["a"], spec))
    assert all(adapter_nbytes(parse_adapter(d, spec)) == one for d in blobs.values())
    s = AdapterStore(str(tmp_path), spec, parsed_cache_bytes=int(2.5 * one))
    parses = []
    real = store_mod.parse_adapter
    monkeypatch.setattr(store_mod, "parse_adapter", lambda *a: parses.append(1) or real(*a))
    for n in "abc":
        s.put(n, blobs[n])  # each parsed once, cached on the way in
    assert s.cached() == ["default/b", "default/c"] and s.cached_bytes == 2 * one <= int(2.5 * one)
    first_b = s.get("b").adapter
    assert s.cached() == ["default/c", "default/b"] and len(parses) == 3
    assert s.get("b").adapter is first_b  # a hit is the same object (the engine relies on it)
    s.get("a")  # a miss: parsed again, evicting the least recently used (c)
    assert len(parses) == 4 and s.cached() == ["default/b", "default/a"]
    s.put("d", blobs["d"])
    assert s.cached() == ["default/a", "default/d"] and s.cached_bytes == 2 * one
    s.delete("a")
    assert s.cached() == ["default/d"] and s.cached_bytes == one

    nothing = AdapterStore(str(tmp_path), spec, parsed_cache_bytes=0)
    assert nothing.get("b").version == sha(blobs["b"]) and nothing.cached() == [] and nothing.cached_bytes == 0


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_store_full_and_keeps_the_old_version(tmp_path, model, spec, monkeypatch, where, code):
    s = AdapterStore(str(tmp_path), spec)
    v1, v2 = adapter_bytes(model, 1), adapter_bytes(model, 2)
    s.put("t/x", v1)
    before = sorted(os.listdir(tmp_path / "t"))

    def full(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_mod, "_write_all" if where == "write" else "_fsync", full)
    with pytest.raises(StoreFull, match="insufficient storage") as err:
        s.put("t/x", v2)
    assert str(tmp_path / "t") in str(err.value)
    with pytest.raises(StoreFull):
        s.put("t/new", v2)
    with pytest.raises(StoreFull):  # the streaming path: write then finish
        with s.begin_upload("t/x") as up:
            up.write(v2)
            up.finish()
            s.put_file("t/x", up.path, up.sha256, up.size)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "t")) == before and temp_files(tmp_path) == []
    assert s.get("t/x").version == sha(v1) and [i.sha256 for i in s.list("t")] == [sha(v1)]
    assert AdapterStore(str(tmp_path), spec).get("t/x").version == sha(v1)


def test_put_file_commits_or_removes_the_temporary_file(tmp_path, model, spec, count_hashes):
    s = AdapterStore(str(tmp_path), spec)
    v1, v2 = adapter_bytes(model, 1), adapter_bytes(model, 2, rank=8)
    with s.begin_upload("t/x") as up:
        for i in range(0, len(v1), 1000):
            up.write(v1[i:i + 1000])
        up.finish()
        assert os.path.dirname(up.path) == str(tmp_path / "t") and os.path.basename(up.path).startswith(".upload-")
        count_hashes.clear()
        info, created = s.put_file("t/x", up.path, up.sha256, up.size)
    assert created and info.sha256 == sha(v1) and count_hashes == []  # the writer's hash is used
    assert temp_files(tmp_path) == []
    before = sorted(os.listdir(tmp_path / "t"))
    for body, error, kw in [(b"garbage" * 10, AdapterFormatError, {}),
                            (v2, StorageQuotaExceeded, {"limit": StorageLimit(max_bytes=len(v1) + 10)}),
                            (v2, ValueError, {"size": 1})]:
        with s.begin_upload("t/x") as up:
            up.write(body)
            up.finish()
            with pytest.raises(error):
                s.put_file("t/x", up.path, up.sha256, **{"size": up.size, **kw})
            assert not os.path.exists(up.path)
    assert sorted(os.listdir(tmp_path / "t")) == before and temp_files(tmp_path) == []
    assert s.get("t/x").version == sha(v1)
    with pytest.raises(ValueError, match="temporary file"):
        s.put_file("t/x", str(tmp_path / "t" / "x.safetensors"))  # never a file that is not an upload's
    assert s.get("t/x").version == sha(v1)


def test_leftovers_of_a_crash_are_removed_at_start_but_not_a_live_upload(tmp_path, model, spec):
    s = AdapterStore(str(tmp_path), spec)
    s.put("t/x", adapter_bytes(model, 1))
    left = [tmp_path / ".upload-abc.tmp", tmp_path / "t" / ".upload-def.tmp", tmp_path / "t" / ".upload-x.tmp"]
    for p in left:
        p.write_bytes(b"half an adapter")
    orphan = tmp_path / "t" / ("gone.safetensors" + SIDECAR)
    orphan.write_text("{}")
    live = s.begin_upload("t/y")  # another replica's upload in progress: it holds the lock
    live.write(b"partial")
    try:
        again = AdapterStore(str(tmp_path), spec)
        assert sorted(again.removed_at_start) == sorted(map(str, left + [orphan]))
        assert temp_files(tmp_path) == [live.path]
        assert sorted(os.listdir(tmp_path / "t")) == sorted(
            [os.path.basename(live.path), "x.safetensors", "x.safetensors" + SIDECAR])
    finally:
        live.close()
    assert temp_files(tmp_path) == []


def test_an_unusable_store_directory_is_named(tmp_path, spec):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for path in (a_file, a_file / "store"):
        with pytest.raises(StoreNotWritable, match="not a directory") as err:
            check_writable(str(path))
        assert str(path) in str(err.value) and "--store" in str(err.value)
        with pytest.raises(StoreNotWritable):
            AdapterStore(str(path), spec)
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop writes, so the permission case cannot be shown")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreNotWritable, match="not writable") as err:
            AdapterStore(str(ro), spec)
        assert str(ro) in str(err.value)
    finally:
        ro.chmod(0o700)
