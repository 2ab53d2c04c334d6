"""What every adapter store backend shares: names (`tenant/id`), errors, infos, the parsed-adapter LRU, and
the `Store` interface the HTTP layer and the engine call.

An adapter's version is the sha256 of its bytes: the engine keys resident slots by (name, version), so a request
keeps the version it started with while a new one is published. Backends:

* `LocalStore` (server/store/local.py): one directory per tenant on a local or shared file system (default).
* `S3Store` (server/store/s3.py): immutable objects named by sha256 in S3-compatible object storage, the
  name → version index in the tenants' database, and a bounded local disk cache (server/store/cache.py).
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from adapters.file import Adapter, BaseSpec
from server.startup import StartupError

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TENANT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
DEFAULT_TENANT = "default"
DEFAULT_PARSED_CACHE_BYTES = 512 * 2**20


class InvalidAdapterId(ValueError):
    pass


class AdapterNotFound(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} not found"


class StoreFull(Exception):
    """The disk under the store is full (ENOSPC) or over its quota (EDQUOT): HTTP 507; nothing changed."""


class StoreNotWritable(StartupError, RuntimeError):
    """The store's directory cannot be created or written; the message names the path."""


class StoreUnavailable(RuntimeError):
    """The object storage cannot be reached or lacks an object the index names: HTTP 503; nothing changed."""


class StorageQuotaExceeded(Exception):
    """Storing the adapter would exceed the tenant's storage quota (HTTP 403 quota_exceeded)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StorageLimit:
    max_adapters: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    method: str
    rank: int
    bytes: int
    sha256: str
    description: str | None = None
    tenant: str = DEFAULT_TENANT

    @property
    def name(self) -> str:
        return f"{self.tenant}/{self.id}"


@dataclass(frozen=True)
class StoredAdapter:
    info: AdapterInfo
    adapter: Adapter

    @property
    def version(self) -> str:
        return self.info.sha256


def check_id(adapter_id: str) -> str:
    """Ids are 1–64 characters of [A-Za-z0-9._-], matched in full, and never a path ('.', '..' refused)."""
    if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id) or adapter_id in (".", ".."):
        raise InvalidAdapterId(f"invalid adapter id {adapter_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    return adapter_id


def split_name(name: str) -> tuple[str, str]:
    """`tenant/id` or `id` (the default tenant's) as (tenant, id), both checked."""
    tenant, sep, adapter_id = name.rpartition("/")
    if not sep:
        return DEFAULT_TENANT, check_id(adapter_id)
    if not TENANT_RE.fullmatch(tenant):
        raise InvalidAdapterId(f"invalid adapter id {name!r}: use id or tenant/id, each 1-64 characters of "
                               "A-Z a-z 0-9 . _ -")
    return tenant, check_id(adapter_id)


def qualified(name: str) -> str:
    """The canonical `tenant/id` of a name."""
    return "/".join(split_name(name))


def adapter_nbytes(adapter: Adapter) -> int:
    """The host memory of a parsed adapter: the sum of its tensors' nbytes."""
    tensors = [t for ps in adapter.layers.values() for t in ps.values()] + list(adapter.glob.values())
    return sum(t.numel() * t.element_size() for t in tensors)


class ParsedCache:
    """Parsed adapters by name, least recently used first, bounded by the bytes of their tensors. Each item
    carries the key of the version it was parsed from (a stat key, a sha256): a lookup with another key misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[StoredAdapter, Hashable, int]] = OrderedDict()

    def get(self, name: str, key: Hashable) -> StoredAdapter | None:
        item = self._items.get(name)
        if item is None or item[1] != key:
            return None
        self._items.move_to_end(name)
        return item[0]

    def put(self, name: str, stored: StoredAdapter, key: Hashable) -> int:
        """Cache `stored`; returns how many other adapters were evicted to make room."""
        self.pop(name)
        size = adapter_nbytes(stored.adapter)
        if size > self.max_bytes:
            return 0
        self._items[name] = (stored, key, size)
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            _, (_, _, freed) = self._items.popitem(last=False)
            self.bytes -= freed
            evicted += 1
        return evicted

    def pop(self, name: str) -> None:
        item = self._items.pop(name, None)
        if item is not None:
            self.bytes -= item[2]

    def names(self) -> list[str]:
        return list(self._items)


@dataclass
class StoreCounters:
    """What a store did since it opened, for /metrics: parsed-cache hits and misses, adapters parsed (loads)
    and the seconds that took (reading, downloading and parsing), LRU evictions; for the S3 backend also the
    disk cache's hits, downloads and evictions."""

    hits: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    disk_hits: int = 0
    downloads: int = 0
    disk_evictions: int = 0


class Store(ABC):
    """The adapter store interface. Names are `tenant/id` (or a default-tenant `id`). Every method may block
    (file system, database, object storage): the HTTP layer calls them in worker threads."""

    spec: BaseSpec
    counters: StoreCounters

    def __init__(self, spec: BaseSpec, parsed_cache_bytes: int):
        self.spec = spec
        self.counters = StoreCounters()
        self.on_load: Callable[[float], None] | None = None  # told the seconds of each load (metrics)
        self._lock = threading.Lock()
        self._cache = ParsedCache(parsed_cache_bytes)

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the adapters are, for logs: a directory or an s3:// URL."""

    @abstractmethod
    def begin_upload(self, name: str):
        """A temporary file (an `Upload`) to stream adapter `name` into, for `put_file`. Raises InvalidAdapterId,
        StoreFull."""

    @abstractmethod
    def put(self, name: str, data: bytes, limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """Validate and publish; returns (info, created). Raises AdapterFormatError, InvalidAdapterId,
        StorageQuotaExceeded (checked atomically with the publish), StoreFull (the old version kept)."""

    @abstractmethod
    def put_file(self, name: str, tmp_path: str, sha256: str | None = None, size: int | None = None,
                 limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """As `put`, from the finished temporary file of `begin_upload(name)`; the file is gone afterwards."""

    @abstractmethod
    def check_quota(self, name: str, size: int, limit: StorageLimit) -> None:
        """Raises StorageQuotaExceeded when `size` bytes would not fit now (an early answer: publishing checks
        again)."""

    @abstractmethod
    def get(self, name: str) -> StoredAdapter:
        """The current version, parsed. Raises AdapterNotFound, InvalidAdapterId, AdapterFormatError."""

    @abstractmethod
    def info(self, name: str) -> AdapterInfo:
        """The current version's info, never parsing tensors. Raises AdapterNotFound, InvalidAdapterId,
        AdapterFormatError."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Unpublish the adapter. Raises AdapterNotFound."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether an adapter of that name is published now (False for an invalid name)."""

    @abstractmethod
    def tenants(self) -> list[str]:
        """Tenants that have adapters stored."""

    @abstractmethod
    def ids(self, tenant: str = DEFAULT_TENANT) -> list[str]:
        """The ids a tenant has stored, sorted."""

    @abstractmethod
    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        """The servable adapters of one tenant, or of every tenant (None)."""

    def delete_tenant(self, tenant: str) -> list[str]:
        """Remove every adapter of a tenant; returns their ids."""
        ids = self.ids(tenant)
        for adapter_id in ids:
            try:
                self.delete(f"{tenant}/{adapter_id}")
            except AdapterNotFound:
                pass
        return ids

    def adopt_legacy(self) -> list[str]:
        """Move adapters of a store from before tenants into the default tenant; returns their ids."""
        return []

    def cached(self) -> list[str]:
        """Names of the parsed adapters held in memory, least recently used first."""
        with self._lock:
            return self._cache.names()

    @property
    def cached_bytes(self) -> int:
        return self._cache.bytes

    def _loaded(self, seconds: float) -> None:
        with self._lock:
            self.counters.loads += 1
            self.counters.load_seconds += seconds
        if self.on_load is not None:
            self.on_load(seconds)

    def close(self) -> None:
        """Release what the store holds open (connections); the default holds nothing."""


def quota_error(tenant: str, sizes: dict[str, int], adapter_id: str, size: int,
                limit: StorageLimit) -> StorageQuotaExceeded | None:
    """Whether storing `adapter_id` of `size` bytes beside the tenant's other adapters (`sizes`: id → bytes,
    the one being replaced included) breaks `limit`; the error to raise, or None."""
    files = {i: s for i, s in sizes.items() if i != adapter_id}
    if limit.max_adapters is not None and len(files) + 1 > limit.max_adapters:
        return StorageQuotaExceeded(f"storage quota exceeded: tenant {tenant!r} may store at most "
                                    f"{limit.max_adapters} adapters (max_adapters)", "max_adapters")
    if limit.max_bytes is not None and sum(files.values()) + size > limit.max_bytes:
        return StorageQuotaExceeded(f"storage quota exceeded: tenant {tenant!r} may store at most "
                                    f"{limit.max_bytes} bytes of adapters (max_storage_bytes); this file "
                                    f"({size} bytes) would bring it to {sum(files.values()) + size}",
                                    "max_storage_bytes")
    return None
