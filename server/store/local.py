"""The local adapter store (the default backend): validated adapter files, one directory per tenant, `<tenant>/<id>.safetensors`.

Below the HTTP layer an adapter is named `tenant/id` (a plain `id` is the `default` tenant's: open mode and
stores from before tenants). Writes go to a temporary file in the same directory (`.upload-*.tmp`, held under
an exclusive flock while it is written), are fsynced and renamed over the old file, so a crash never leaves a
half adapter and a failed upload leaves the store as it was. A full disk (ENOSPC) or quota (EDQUOT) while
writing is `StoreFull` (HTTP 507), with the old version kept. Replicas of one deployment may share the
directory. An adapter's version is the sha256 of its bytes: the engine keys resident slots by (name, version),
so a request keeps the version it started with while a new one is uploaded.

Memory and start-up stay bounded however many adapters are stored:

* An index holds each adapter's AdapterInfo (method, rank, description from the safetensors header; size;
  sha256), built at start-up from the headers only. The sha256 comes from a sidecar `<id>.safetensors.sha256`
  written (temp file + rename) right after each commit; it records the adapter's (size, mtime_ns, ctime_ns,
  inode) as fstat gave them through the committed file's own descriptor, so a sidecar is trusted only for the
  very file it was written for: another replica's rename (new inode), an edit in place (mtime, ctime), even a
  copy that preserves mtime (ctime) all make it stale, and a stale or missing sidecar falls back to hashing
  that one file (and rewrites the sidecar). The sidecar is written after the rename, not before, because a
  rename updates ctime on Linux file systems.
* `list()` stats the files (another replica may have written some) and reads only the index, refreshing an
  entry from its header when the file changed; it never parses tensors.
* Parsed adapters live in an LRU bounded in bytes (the sum of their tensors' nbytes); `get()` re-parses on a
  miss, and a stat that no longer matches the cached file (another replica replaced it) is a miss.

At construction the store checks that its directory can be written (`StoreNotWritable` names the path) and
removes temporary files left by a crash: those no process holds a lock on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass

from adapters.file import MAX_HEADER, Adapter, AdapterFormatError, BaseSpec, parse_adapter, peek_metadata
from adapters.methods import get_method
from server.store.base import (DEFAULT_PARSED_CACHE_BYTES, DEFAULT_TENANT, ID_RE, TENANT_RE, AdapterInfo,
                               AdapterNotFound, StorageLimit, Store, StoredAdapter, StoreFull, StoreNotWritable,
                               quota_error, split_name)

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
SIDECAR = ".sha256"  # `<id>.safetensors.sha256`
TEMP_PREFIX, TEMP_SUFFIX = ".upload-", ".tmp"
HASH_CHUNK = 1 << 20
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNLOCKABLE_TEMP_AGE_S = 3600.0  # where flock is unsupported, a temp file this old is a crash's leftover

StatKey = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, inode)


def check_writable(path: str) -> None:
    """Create `path` if needed and create and delete a probe file in it; raises StoreNotWritable naming it."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        what = "it is not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise StoreNotWritable(f"cannot use {path} as the adapter store directory: {what} "
                               "(choose another directory with --store)") from exc
    if not os.path.isdir(path):
        raise StoreNotWritable(f"cannot use {path} as the adapter store directory: it is not a directory "
                               "(choose another directory with --store)")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=TEMP_PREFIX + "probe-", suffix=TEMP_SUFFIX)
        os.close(fd)
        _unlink_quiet(probe)
    except OSError as exc:
        raise StoreNotWritable(f"the adapter store directory {path} is not writable ({exc.strerror}): uploaded "
                               "adapters are written there; fix its owner or permissions, or choose another "
                               "directory with --store") from exc


class Upload:
    """An adapter file being received: a temporary file in its tenant's directory, locked (so a starting
    replica's sweep leaves it alone) and hashed as it is written. `close()` (or leaving the `with`) removes it
    unless it was committed (renamed into place)."""

    def __init__(self, directory: str):
        self.fd, self.path = _temp_file(directory)
        self.size = 0
        self._sha = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def write(self, data: bytes) -> None:
        """Append `data`. Raises StoreFull on ENOSPC/EDQUOT."""
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            _raise_if_full(exc, self.path)
            raise
        self._sha.update(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush the file to disk (fsync). Raises StoreFull on ENOSPC/EDQUOT (delayed allocation, NFS)."""
        try:
            _fsync(self.fd)
        except OSError as exc:
            _raise_if_full(exc, self.path)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        _unlink_quiet(self.path)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Entry:
    """What the index knows of one file: its stat key and its info, or why it is not a servable adapter."""

    key: StatKey
    info: AdapterInfo | None
    error: str | None = None


class LocalStore(Store):
    """Validated adapters on disk, an index of their infos, and an LRU of parsed files bounded in bytes."""

    def __init__(self, root: str, spec: BaseSpec, parsed_cache_bytes: int = DEFAULT_PARSED_CACHE_BYTES):
        super().__init__(spec, parsed_cache_bytes)
        self.root = os.path.abspath(root)
        check_writable(self.root)
        self._index: dict[str, _Entry] = {}
        self.removed_at_start = self._sweep()
        started = time.monotonic()
        n = sum(len(self._refresh(t)) for t in self.tenants())
        log.info("adapter store %s: %d adapters indexed in %.2f s", self.root, n, time.monotonic() - started)

    @property
    def location(self) -> str:
        return self.root

    def _dir(self, tenant: str) -> str:
        return os.path.join(self.root, tenant)

    def _path(self, name: str) -> tuple[str, str, str]:
        tenant, adapter_id = split_name(name)
        return tenant, adapter_id, os.path.join(self.root, tenant, adapter_id + SUFFIX)

    def adopt_legacy(self) -> list[str]:
        """Move adapter files from the store's top level (a store from before tenants) into the default
        tenant's directory; returns the ids moved. Idempotent and crash-safe (one rename per file)."""
        moved = []
        os.makedirs(self._dir(DEFAULT_TENANT), exist_ok=True)
        for n in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, n)
            if n.endswith(SUFFIX) and ID_RE.fullmatch(n[: -len(SUFFIX)]) and os.path.isfile(path):
                os.replace(path, os.path.join(self._dir(DEFAULT_TENANT), n))
                moved.append(n[: -len(SUFFIX)])
        if moved:
            _fsync_dir(self._dir(DEFAULT_TENANT))
            _fsync_dir(self.root)
        return moved

    # -- writing

    def begin_upload(self, name: str) -> Upload:
        """A temporary file for adapter `name`, in its tenant's directory (for `put_file`). Raises
        InvalidAdapterId, StoreFull."""
        tenant, _, _ = self._path(name)
        try:
            os.makedirs(self._dir(tenant), exist_ok=True)
            return Upload(self._dir(tenant))
        except OSError as exc:
            _raise_if_full(exc, self._dir(tenant))
            raise

    def put(self, name: str, data: bytes, limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """Validate and store; returns (info, created). Raises AdapterFormatError, InvalidAdapterId,
        StorageQuotaExceeded (checked under the store's lock, so concurrent uploads cannot both pass),
        StoreFull (the old version kept)."""
        tenant, adapter_id, path = self._path(name)
        adapter = parse_adapter(data, self.spec)  # raises before anything is written
        with self.begin_upload(name) as upload:
            upload.write(data)
            upload.finish()
            return self._commit(tenant, adapter_id, path, upload.path, upload.fd, adapter, upload.sha256,
                                len(data), limit)

    def put_file(self, name: str, tmp_path: str, sha256: str | None = None, size: int | None = None,
                 limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """Validate the finished (fsynced) temporary file `tmp_path` — made by `begin_upload(name)` — and
        rename it into place, as `put` does; returns (info, created). `sha256` and `size` are what the writer
        saw (the sha256 is not recomputed). The temporary file is gone afterwards, stored or refused."""
        tenant, adapter_id, path = self._path(name)
        tmp_path = os.path.abspath(tmp_path)
        if os.path.dirname(tmp_path) != self._dir(tenant) or not os.path.basename(tmp_path).startswith(TEMP_PREFIX):
            raise ValueError(f"the upload's temporary file must be a {TEMP_PREFIX}* file in {self._dir(tenant)}")
        try:
            with open(tmp_path, "rb") as f:
                have = os.fstat(f.fileno()).st_size
                if size is not None and have != size:
                    raise ValueError(f"the upload's temporary file holds {have} bytes, not {size}")
                data = f.read()
                adapter = parse_adapter(data, self.spec)
                digest = sha256 or hashlib.sha256(data).hexdigest()
                n = len(data)
                del data
                return self._commit(tenant, adapter_id, path, tmp_path, f.fileno(), adapter, digest, n, limit)
        finally:
            _unlink_quiet(tmp_path)

    def check_quota(self, name: str, size: int, limit: StorageLimit) -> None:
        """Whether an adapter of `size` bytes would fit the tenant's quota now (raises StorageQuotaExceeded);
        an early answer only: the commit checks again under the lock."""
        tenant, adapter_id, _ = self._path(name)
        self._check_limit(tenant, adapter_id, size, limit)

    def _commit(self, tenant: str, adapter_id: str, path: str, tmp: str, fd: int, adapter: Adapter, sha: str,
                size: int, limit: StorageLimit | None) -> tuple[AdapterInfo, bool]:
        name = f"{tenant}/{adapter_id}"
        info = AdapterInfo(id=adapter_id, method=adapter.method, rank=adapter.rank, bytes=size, sha256=sha,
                           description=adapter.description, tenant=tenant)
        with self._lock:
            created = not os.path.exists(path)
            if limit is not None:
                self._check_limit(tenant, adapter_id, size, limit)
            try:
                os.replace(tmp, path)
            except OSError as exc:
                _raise_if_full(exc, path)
                raise
            key = _stat_key(os.fstat(fd))  # the committed inode, whatever the path names by now
            self._write_sidecar(path, key, sha)
            self._index[name] = _Entry(key, info)
            self.counters.evictions += self._cache.put(name, StoredAdapter(info, adapter), key)
        try:
            _fsync_dir(self._dir(tenant))
        except OSError as exc:  # the rename is done; the directory's own flush is best effort
            log.warning("fsync of %s failed after storing %s: %s", self._dir(tenant), name, exc)
        return info, created

    def _check_limit(self, tenant: str, adapter_id: str, size: int, limit: StorageLimit) -> None:
        if (err := quota_error(tenant, self._sizes(tenant), adapter_id, size, limit)) is not None:
            raise err

    def _sizes(self, tenant: str) -> dict[str, int]:
        out = {}
        for adapter_id in self.ids(tenant):
            try:
                out[adapter_id] = os.path.getsize(os.path.join(self._dir(tenant), adapter_id + SUFFIX))
            except FileNotFoundError:
                continue
        return out

    # -- reading

    def get(self, name: str) -> StoredAdapter:
        """The current version of an adapter, parsed (from the LRU when the file is unchanged). Raises
        AdapterNotFound, InvalidAdapterId, AdapterFormatError."""
        tenant, adapter_id, path = self._path(name)
        key_name = f"{tenant}/{adapter_id}"
        try:
            key = _stat_key(os.stat(path))
        except FileNotFoundError:
            self._forget(key_name)
            raise AdapterNotFound(name) from None
        with self._lock:
            hit = self._cache.get(key_name, key)
            entry = self._index.get(key_name)
        if hit is not None:
            self.counters.hits += 1
            return hit
        if entry is not None and entry.key == key and entry.info is None:
            raise AdapterFormatError(entry.error or "not a servable adapter")  # unchanged since it failed
        started = time.monotonic()
        try:
            with open(path, "rb") as f:  # another replica may have written it
                key = _stat_key(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            self._forget(key_name)
            raise AdapterNotFound(name) from None
        digest = hashlib.sha256(data).hexdigest()
        try:
            adapter = parse_adapter(data, self.spec)
        except AdapterFormatError as exc:
            with self._lock:
                self._index[key_name] = _Entry(key, None, str(exc))
                self._cache.pop(key_name)
            raise
        info = AdapterInfo(id=adapter_id, method=adapter.method, rank=adapter.rank, bytes=len(data),
                           sha256=digest, description=adapter.description, tenant=tenant)
        stored = StoredAdapter(info, adapter)
        with self._lock:
            self._index[key_name] = _Entry(key, info)
            self.counters.evictions += self._cache.put(key_name, stored, key)
        self._loaded(time.monotonic() - started)
        return stored

    def info(self, name: str) -> AdapterInfo:
        """An adapter's info from the index (refreshed from the file's header when the file changed); never
        parses tensors. Raises AdapterNotFound, InvalidAdapterId, AdapterFormatError."""
        tenant, adapter_id, path = self._path(name)
        entry = self._entry(tenant, adapter_id, path)
        if entry is None:
            raise AdapterNotFound(name)
        if entry.info is None:
            raise AdapterFormatError(entry.error or "not a servable adapter")
        return entry.info

    def _entry(self, tenant: str, adapter_id: str, path: str) -> _Entry | None:
        key_name = f"{tenant}/{adapter_id}"
        try:
            key = _stat_key(os.stat(path))
        except FileNotFoundError:
            self._forget(key_name)
            return None
        with self._lock:
            entry = self._index.get(key_name)
        if entry is not None and entry.key == key:
            return entry
        entry = self._scan(tenant, adapter_id, path)
        with self._lock:
            if entry is None:
                self._index.pop(key_name, None)
            else:
                self._index[key_name] = entry
        return entry

    def _scan(self, tenant: str, adapter_id: str, path: str) -> _Entry | None:
        """An index entry from the file's header and size, the sha256 from its sidecar (or, stale or missing,
        from hashing the file, then written to a new sidecar). None when the file is gone."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        with f:
            key = _stat_key(os.fstat(f.fileno()))
            try:
                meta = self._read_metadata(f, key[0])
            except AdapterFormatError as exc:
                return _Entry(key, None, str(exc))
            sha = _read_sidecar(path, key)
            if sha is None:
                f.seek(0)
                sha = _hash_file(f)
                if _stat_key(os.fstat(f.fileno())) != key:
                    return _Entry((-1, 0, 0, 0), None, "changed while it was read")  # stale: rescanned next time
                self._write_sidecar(path, key, sha)
        info = AdapterInfo(id=adapter_id, method=meta["method"], rank=int(meta["rank"]), bytes=key[0], sha256=sha,
                           description=meta.get("description"), tenant=tenant)
        return _Entry(key, info)

    def _read_metadata(self, f, size: int) -> dict[str, str]:
        """The `__metadata__` of an open adapter file, from its header alone, with the checks that need no
        tensor: ours (format, method, rank), for this base model (fingerprint), rank within r_max."""
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError("not a safetensors file: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise AdapterFormatError("not a safetensors file: header length exceeds the file size")
        meta = peek_metadata(head + f.read(n))
        fp = meta.get("base_fingerprint")
        if fp and fp != self.spec.fingerprint:
            raise AdapterFormatError(f"base_fingerprint {fp!r} is not this server's base model "
                                     f"({self.spec.fingerprint!r})")
        if get_method(meta["method"]).uses_factors and int(meta["rank"]) > self.spec.r_max:
            raise AdapterFormatError(f"rank {meta['rank']} exceeds this server's max rank r_max={self.spec.r_max}")
        return meta

    def _write_sidecar(self, path: str, key: StatKey, sha: str) -> None:
        """Best effort (a missing sidecar costs one hash at the next start): temp file + rename, no fsync."""
        body = json.dumps({"sha256": sha, "size": key[0], "mtime_ns": key[1], "ctime_ns": key[2],
                           "ino": key[3]}).encode()
        tmp = None
        try:
            fd, tmp = _temp_file(os.path.dirname(path))
            try:
                _write_all(fd, body)
            finally:
                os.close(fd)
            os.replace(tmp, path + SIDECAR)
        except OSError as exc:
            log.debug("no sidecar for %s: %s", path, exc)
            if tmp is not None:
                _unlink_quiet(tmp)

    def _forget(self, key_name: str) -> None:
        with self._lock:
            self._index.pop(key_name, None)
            self._cache.pop(key_name)

    def delete(self, name: str) -> None:
        tenant, adapter_id, path = self._path(name)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise AdapterNotFound(name) from None
            _unlink_quiet(path + SIDECAR)
            self._index.pop(f"{tenant}/{adapter_id}", None)
            self._cache.pop(f"{tenant}/{adapter_id}")
        _fsync_dir(self._dir(tenant))

    def exists(self, name: str) -> bool:
        """Whether an adapter of that name is stored (False for an invalid name)."""
        try:
            return os.path.isfile(self._path(name)[2])
        except InvalidAdapterId:
            return False

    def tenants(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root)
                      if TENANT_RE.fullmatch(n) and os.path.isdir(os.path.join(self.root, n)))

    def ids(self, tenant: str = DEFAULT_TENANT) -> list[str]:
        try:
            names = os.listdir(self._dir(tenant))
        except FileNotFoundError:
            return []
        return sorted(n[: -len(SUFFIX)] for n in names
                      if n.endswith(SUFFIX) and ID_RE.fullmatch(n[: -len(SUFFIX)]))

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        """The adapters of one tenant, or of every tenant (None), from the index: one stat per file, and a
        header read only for a file that changed since it was indexed. Files that are not servable adapters
        (a foreign file, another base model's) are left out."""
        out = []
        for t in [tenant] if tenant is not None else self.tenants():
            out.extend(self._refresh(t))
        return out

    def _refresh(self, tenant: str) -> list[AdapterInfo]:
        ids = self.ids(tenant)
        out = []
        for adapter_id in ids:
            entry = self._entry(tenant, adapter_id, os.path.join(self._dir(tenant), adapter_id + SUFFIX))
            if entry is not None and entry.info is not None:
                out.append(entry.info)
        present = {f"{tenant}/{i}" for i in ids}
        with self._lock:
            for key_name in [k for k in self._index if k.startswith(tenant + "/") and k not in present]:
                del self._index[key_name]
        return out

    def _sweep(self) -> list[str]:
        """Remove what a crash left behind: temporary files no process holds (in the store's top level and
        every tenant's directory) and sidecars whose adapter is gone. Returns the paths removed."""
        removed = []
        for d in [self.root] + [self._dir(t) for t in self.tenants()]:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                p = os.path.join(d, n)
                if n.startswith(TEMP_PREFIX) and n.endswith(TEMP_SUFFIX):
                    if _abandoned(p) and _unlink_quiet(p):
                        removed.append(p)
                elif d != self.root and n.endswith(SUFFIX + SIDECAR) and not os.path.exists(p[: -len(SIDECAR)]):
                    if _unlink_quiet(p):
                        removed.append(p)
        if removed:
            log.info("adapter store %s: removed %d files left by an interrupted write", self.root, len(removed))
        return removed


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_sidecar(path: str, key: StatKey) -> str | None:
    """The sha256 the sidecar records, if it was written for exactly this file (else None)."""
    try:
        with open(path + SIDECAR, "rb") as f:
            rec = json.loads(f.read(4096))
        if (rec["size"], rec["mtime_ns"], rec["ctime_ns"], rec["ino"]) != key:
            return None
        sha = rec["sha256"]
        return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hash_file(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _temp_file(directory: str) -> tuple[int, str]:
    """A new `.upload-*.tmp` in `directory`, under an exclusive flock held as long as the descriptor is open."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no flock on this file system: the sweep goes by age
    return fd, path


def _abandoned(path: str) -> bool:
    """Whether no process is writing the temporary file: its flock can be taken (the writer's lock goes with
    it when it dies), or, where flock is unsupported, it is older than an hour."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        try:
            return time.time() - os.fstat(fd).st_mtime > UNLOCKABLE_TEMP_AGE_S
        except OSError:
            return False
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _raise_if_full(exc: OSError, where: str) -> None:
    """ENOSPC/EDQUOT raised as StoreFull, naming the directory; any other error is left to the caller."""
    if exc.errno in FULL_ERRNOS:
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is exceeded"
        place = where if os.path.isdir(where) else os.path.dirname(where)
        raise StoreFull(f"insufficient storage: {what} under the adapter store ({place}); nothing was changed "
                        "(the previous version, if any, is still served)") from exc


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


AdapterStore = LocalStore  # the class's name from before there were backends (tests, benches, scripts)
