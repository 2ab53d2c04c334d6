"""The S3 adapter store: `--store s3://BUCKET/PREFIX`, for replicas that share one database and one bucket.

* Objects are immutable and named by the sha256 of their bytes: `PREFIX/objects/<sha256>`. Uploading the same
  bytes twice stores one object.
* The index — which version each `tenant/id` is published at, with its method, rank, size and description —
  is the `adapter_versions` table of the tenants' database (PostgreSQL for a fleet). Publishing a version is
  one transaction (quota check and upsert under a per-tenant lock), deleting one is one `DELETE`: every
  replica's next lookup sees it. `get()` reads the row on every call, so a request always resolves the current
  version; only the bytes and the parsed tensors of a version are cached (they never change).
* Each replica keeps a bounded disk cache of objects (server/store/cache.py) and the parsed-adapter LRU.

The client is obstore (the Rust `object_store` crate): configured the standard way from AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and the other AWS_* variables it knows); an http://
endpoint (a test server, a MinIO on a private network) is allowed without AWS_ALLOW_HTTP. Objects stream to
and from the disk cache in chunks (multipart uploads for large files), never whole in memory on the way.

Objects of deleted or replaced versions stay in the bucket (another adapter may have the same bytes, and a
replica may be loading it); `unreferenced_objects()` lists those an operator may remove.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from datetime import UTC, datetime
from urllib.parse import urlparse

from sqlalchemy import Engine, delete, func, insert, select, text, update

from adapters.file import BaseSpec, parse_adapter
from server.store.base import (DEFAULT_PARSED_CACHE_BYTES, DEFAULT_TENANT, AdapterInfo, AdapterNotFound,
                               StorageLimit, Store, StoredAdapter, StoreNotWritable, StoreUnavailable, quota_error,
                               split_name)
from server.store.cache import DEFAULT_CACHE_BYTES, DiskCache
from server.store.local import TEMP_PREFIX, Upload, _raise_if_full, _unlink_quiet
from server.tenancy.models import AdapterVersion

log = logging.getLogger(__name__)
INDEX = AdapterVersion.__table__
OBJECTS = "objects/"
# the standard variables a deployment sets for this store (obstore reads them, and the other AWS_* it knows)
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
DOWNLOAD_CHUNK = 1 << 20


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` as (bucket, prefix without slashes at its ends); the prefix may be empty."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"not an S3 store URL: {url!r} (use s3://BUCKET/PREFIX)")
    return u.netloc, u.path.strip("/")


def object_store(bucket: str, prefix: str):
    """An obstore S3Store for the bucket, configured from the AWS_* environment."""
    from obstore.store import S3Store as ObjectStore

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options = {"allow_http": True} if endpoint.startswith("http://") else None
    return ObjectStore(bucket, prefix=prefix or None, client_options=options)


class S3Store(Store):
    """Adapters as immutable objects in S3, the version index in the database, a local disk cache."""

    def __init__(self, url: str, spec: BaseSpec, engine: Engine, cache_dir: str,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, parsed_cache_bytes: int = DEFAULT_PARSED_CACHE_BYTES):
        super().__init__(spec, parsed_cache_bytes)
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.db = engine
        self.disk = DiskCache(cache_dir, cache_bytes)
        self.objects = object_store(self.bucket, self.prefix)
        self._check_bucket()
        log.info("adapter store %s: %d adapters indexed, disk cache %s (%d objects, %d bytes)", self.url,
                 self._count(), self.disk.dir, len(self.disk), self.disk.bytes)

    @property
    def location(self) -> str:
        return self.url

    def _check_bucket(self) -> None:
        """One listing request: the bucket exists and the credentials may read it (else StoreNotWritable)."""
        try:
            self.objects.list_with_delimiter(OBJECTS)
        except Exception as exc:  # obstore raises its own error types for auth, missing buckets and network
            raise StoreNotWritable(f"cannot use {self.url} as the adapter store: {_first_line(exc)} (check the "
                                   "bucket and AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                   "AWS_REGION)") from exc

    def _count(self) -> int:
        with self.db.connect() as conn:
            return conn.execute(select(func.count()).select_from(INDEX)).scalar_one()

    # -- writing

    def begin_upload(self, name: str) -> Upload:
        split_name(name)
        try:
            return Upload(self.disk.uploads)
        except OSError as exc:
            _raise_if_full(exc, self.disk.uploads)
            raise

    def put(self, name: str, data: bytes, limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        parse_adapter(data, self.spec)  # raises before anything is written
        with self.begin_upload(name) as upload:
            upload.write(data)
            upload.finish()
            return self.put_file(name, upload.path, upload.sha256, upload.size, limit)

    def put_file(self, name: str, tmp_path: str, sha256: str | None = None, size: int | None = None,
                 limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """Validate the upload, write its object (unless the bucket has those bytes already), then publish the
        version in one transaction; the file then joins the disk cache (or is removed when refused)."""
        tenant, adapter_id = split_name(name)
        tmp_path = os.path.abspath(tmp_path)
        if os.path.dirname(tmp_path) != self.disk.uploads or not os.path.basename(tmp_path).startswith(TEMP_PREFIX):
            raise ValueError(f"the upload's temporary file must be a {TEMP_PREFIX}* file in {self.disk.uploads}")
        try:
            with open(tmp_path, "rb") as f:
                data = f.read()
            if size is not None and len(data) != size:
                raise ValueError(f"the upload's temporary file holds {len(data)} bytes, not {size}")
            adapter = parse_adapter(data, self.spec)
            sha = sha256 or hashlib.sha256(data).hexdigest()
            info = AdapterInfo(id=adapter_id, method=adapter.method, rank=adapter.rank, bytes=len(data), sha256=sha,
                               description=adapter.description, tenant=tenant)
            del data
            if limit is not None:
                self.check_quota(name, info.bytes, limit)  # early: no object written for a refused upload
            self._write_object(sha, tmp_path)
            created = self._publish(info, limit)
            self.disk.add(sha, tmp_path)
        finally:
            _unlink_quiet(tmp_path)
        with self._lock:
            self.counters.evictions += self._cache.put(info.name, StoredAdapter(info, adapter), sha)
        return info, created

    def _write_object(self, sha: str, path: str) -> None:
        key = OBJECTS + sha
        try:
            try:
                self.objects.head(key)
                return  # immutable and named by its bytes: already there is already right
            except FileNotFoundError:
                pass
            with open(path, "rb") as f:
                self.objects.put(key, f)
        except (OSError, RuntimeError, ValueError) as exc:
            raise StoreUnavailable(f"the object storage {self.url} did not take the adapter: "
                                   f"{_first_line(exc)}; nothing was changed") from exc

    def _publish(self, info: AdapterInfo, limit: StorageLimit | None) -> bool:
        """Upsert the index row in one transaction, after the quota check under a per-tenant lock (PostgreSQL:
        an advisory lock; SQLite: the database's single writer). Returns whether the adapter is new."""
        now = datetime.now(UTC)
        values = {"sha256": info.sha256, "bytes": info.bytes, "method": info.method, "rank": info.rank,
                  "description": info.description, "updated_at": now}
        with self._lock, self.db.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(info.tenant)})
            if limit is not None and (err := quota_error(info.tenant, self._sizes(conn, info.tenant), info.id,
                                                         info.bytes, limit)):
                raise err
            where = (INDEX.c.tenant == info.tenant) & (INDEX.c.adapter_id == info.id)
            if conn.execute(update(INDEX).where(where).values(**values)).rowcount:
                return False
            conn.execute(insert(INDEX).values(tenant=info.tenant, adapter_id=info.id, **values))
            return True

    def check_quota(self, name: str, size: int, limit: StorageLimit) -> None:
        tenant, adapter_id = split_name(name)
        with self.db.connect() as conn:
            sizes = self._sizes(conn, tenant)
        if (err := quota_error(tenant, sizes, adapter_id, size, limit)) is not None:
            raise err

    @staticmethod
    def _sizes(conn, tenant: str) -> dict[str, int]:
        rows = conn.execute(select(INDEX.c.adapter_id, INDEX.c.bytes).where(INDEX.c.tenant == tenant))
        return {r.adapter_id: r.bytes for r in rows}

    # -- reading

    def _row(self, tenant: str, adapter_id: str) -> AdapterInfo | None:
        with self.db.connect() as conn:
            r = conn.execute(select(INDEX).where((INDEX.c.tenant == tenant) & (INDEX.c.adapter_id == adapter_id))
                             ).first()
        return None if r is None else _info(r)

    def get(self, name: str) -> StoredAdapter:
        """The version the index names now (one primary-key lookup), parsed: from the LRU, else from the disk
        cache, else downloaded (and checked against its sha256)."""
        tenant, adapter_id = split_name(name)
        key_name = f"{tenant}/{adapter_id}"
        info = self._row(tenant, adapter_id)
        if info is None:
            with self._lock:
                self._cache.pop(key_name)
            raise AdapterNotFound(name)
        with self._lock:
            hit = self._cache.get(key_name, info.sha256)
            if hit is not None:
                self.counters.hits += 1
                return hit
        started = time.monotonic()
        data = self._read_object(info.sha256)
        adapter = parse_adapter(data, self.spec)
        stored = StoredAdapter(info, adapter)
        with self._lock:
            self.counters.evictions += self._cache.put(key_name, stored, info.sha256)
        self._loaded(time.monotonic() - started)
        return stored

    def _read_object(self, sha: str) -> bytes:
        f = self.disk.open(sha)
        if f is not None:
            self.counters.disk_hits += 1
        else:
            self._download(sha)
            f = self.disk.open(sha)
            if f is None:
                raise StoreUnavailable(f"adapter object {sha} was evicted from the disk cache as it arrived; retry")
        with f:
            return f.read()

    def _download(self, sha: str) -> None:
        """Stream object `sha` to a temp file, check its sha256, and move it into the disk cache."""
        upload = Upload(self.disk.uploads)  # a locked temp file, removed unless moved into the cache
        with upload:
            try:
                for chunk in self.objects.get(OBJECTS + sha).stream(min_chunk_size=DOWNLOAD_CHUNK):
                    upload.write(bytes(chunk))
            except FileNotFoundError as exc:
                raise StoreUnavailable(f"the object storage {self.url} lacks the adapter object {sha} that the "
                                       "index names") from exc
            except (RuntimeError, ValueError) as exc:
                raise StoreUnavailable(f"the object storage {self.url} did not answer: {_first_line(exc)}") from exc
            if upload.sha256 != sha:
                raise StoreUnavailable(f"adapter object {sha} in {self.url} does not match its sha256")
            self.disk.add(sha, upload.path)
        self.counters.downloads += 1
        self.counters.disk_evictions = self.disk.evictions

    def info(self, name: str) -> AdapterInfo:
        tenant, adapter_id = split_name(name)
        info = self._row(tenant, adapter_id)
        if info is None:
            raise AdapterNotFound(name)
        return info

    def delete(self, name: str) -> None:
        tenant, adapter_id = split_name(name)
        with self._lock, self.db.begin() as conn:
            gone = conn.execute(delete(INDEX).where((INDEX.c.tenant == tenant) & (INDEX.c.adapter_id == adapter_id)))
            self._cache.pop(f"{tenant}/{adapter_id}")
        if not gone.rowcount:
            raise AdapterNotFound(name)

    def exists(self, name: str) -> bool:
        try:
            return self._row(*split_name(name)) is not None
        except ValueError:
            return False

    def tenants(self) -> list[str]:
        with self.db.connect() as conn:
            return list(conn.execute(select(INDEX.c.tenant).distinct().order_by(INDEX.c.tenant)).scalars())

    def ids(self, tenant: str = DEFAULT_TENANT) -> list[str]:
        with self.db.connect() as conn:
            return list(conn.execute(select(INDEX.c.adapter_id).where(INDEX.c.tenant == tenant)
                                     .order_by(INDEX.c.adapter_id)).scalars())

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        q = select(INDEX).order_by(INDEX.c.tenant, INDEX.c.adapter_id)
        if tenant is not None:
            q = q.where(INDEX.c.tenant == tenant)
        with self.db.connect() as conn:
            return [_info(r) for r in conn.execute(q)]

    def unreferenced_objects(self) -> list[str]:
        """The sha256 of every object in the bucket that no index row names (deleted or replaced versions)."""
        with self.db.connect() as conn:
            used = set(conn.execute(select(INDEX.c.sha256)).scalars())
        out = []
        for batch in self.objects.list(OBJECTS):
            out += [m["path"][len(OBJECTS):] for m in batch if m["path"][len(OBJECTS):] not in used]
        return out


def _info(r) -> AdapterInfo:
    return AdapterInfo(id=r.adapter_id, method=r.method, rank=r.rank, bytes=r.bytes, sha256=r.sha256,
                       description=r.description, tenant=r.tenant)


def _lock_key(tenant: str) -> int:
    """A stable signed 64-bit advisory-lock key per tenant."""
    return int.from_bytes(hashlib.sha256(b"svdserve-store:" + tenant.encode()).digest()[:8], "big", signed=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
