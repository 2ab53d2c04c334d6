"""The adapter store: validated adapter files, one directory per tenant, `<tenant>/<id>.safetensors`.

Below the HTTP layer an adapter is named `tenant/id` (a plain `id` is the `default` tenant's: open mode and
stores from before tenants). Writes go to a temporary file in the same directory, are fsynced and renamed over
the old file, so a crash never leaves a half adapter and a failed upload leaves the store as it was. Replicas
of one deployment may share the directory. An adapter's version is the sha256 of its bytes: the engine keys
resident slots by (name, version), so a request keeps the version it started with while a new one is uploaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

from adapters.file import Adapter, AdapterFormatError, BaseSpec, parse_adapter

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TENANT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
DEFAULT_TENANT = "default"
SUFFIX = ".safetensors"


class InvalidAdapterId(ValueError):
    pass


class AdapterNotFound(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} not found"


class StoreFull(Exception):
    """The disk under the store is full (ENOSPC) or over its quota (EDQUOT): HTTP 507; nothing changed."""


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


class AdapterStore:
    """Validated adapters on disk, with a small cache of parsed files keyed by (name, sha256)."""

    def __init__(self, root: str, spec: BaseSpec):
        self.root, self.spec = os.path.abspath(root), spec
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()
        self._parsed: dict[str, StoredAdapter] = {}

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

    def put(self, name: str, data: bytes, limit: StorageLimit | None = None) -> tuple[AdapterInfo, bool]:
        """Validate and store; returns (info, created). Raises AdapterFormatError, InvalidAdapterId,
        StorageQuotaExceeded (checked under the store's lock, so concurrent uploads cannot both pass)."""
        tenant, adapter_id, path = self._path(name)
        adapter = parse_adapter(data, self.spec)  # raises before anything is written
        info = _info(tenant, adapter_id, adapter, data)
        os.makedirs(self._dir(tenant), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._dir(tenant), prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                created = not os.path.exists(path)
                if limit is not None:
                    self._check_limit(tenant, adapter_id, len(data), limit)
                os.replace(tmp, path)
                self._parsed[info.name] = StoredAdapter(info, adapter)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(self._dir(tenant))
        return info, created

    def _check_limit(self, tenant: str, adapter_id: str, size: int, limit: StorageLimit) -> None:
        files = {i: s for i, s in self._sizes(tenant).items() if i != adapter_id}
        if limit.max_adapters is not None and len(files) + 1 > limit.max_adapters:
            raise StorageQuotaExceeded(f"storage quota exceeded: tenant {tenant!r} may store at most "
                                       f"{limit.max_adapters} adapters (max_adapters)", "max_adapters")
        if limit.max_bytes is not None and sum(files.values()) + size > limit.max_bytes:
            raise StorageQuotaExceeded(f"storage quota exceeded: tenant {tenant!r} may store at most "
                                       f"{limit.max_bytes} bytes of adapters (max_storage_bytes); this file "
                                       f"({size} bytes) would bring it to {sum(files.values()) + size}",
                                       "max_storage_bytes")

    def _sizes(self, tenant: str) -> dict[str, int]:
        out = {}
        for adapter_id in self.ids(tenant):
            try:
                out[adapter_id] = os.path.getsize(os.path.join(self._dir(tenant), adapter_id + SUFFIX))
            except FileNotFoundError:
                continue
        return out

    def get(self, name: str) -> StoredAdapter:
        """The current version of an adapter. Raises AdapterNotFound, InvalidAdapterId."""
        tenant, adapter_id, path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise AdapterNotFound(name) from None
        digest = hashlib.sha256(data).hexdigest()
        key = f"{tenant}/{adapter_id}"
        with self._lock:
            cached = self._parsed.get(key)
            if cached is not None and cached.version == digest:
                return cached
        adapter = parse_adapter(data, self.spec)  # another replica may have written it
        stored = StoredAdapter(_info(tenant, adapter_id, adapter, data), adapter)
        with self._lock:
            self._parsed[key] = stored
        return stored

    def delete(self, name: str) -> None:
        tenant, adapter_id, path = self._path(name)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise AdapterNotFound(name) from None
            self._parsed.pop(f"{tenant}/{adapter_id}", None)
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
        """The adapters of one tenant, or of every tenant (None)."""
        out = []
        for t in [tenant] if tenant is not None else self.tenants():
            for adapter_id in self.ids(t):
                try:
                    out.append(self.get(f"{t}/{adapter_id}").info)
                except (AdapterNotFound, AdapterFormatError):
                    continue  # deleted meanwhile, or a foreign file that does not validate
        return out

    def delete_tenant(self, tenant: str) -> list[str]:
        """Remove every adapter of a tenant; returns their ids."""
        ids = self.ids(tenant)
        for adapter_id in ids:
            try:
                self.delete(f"{tenant}/{adapter_id}")
            except AdapterNotFound:
                pass
        return ids


def _info(tenant: str, adapter_id: str, adapter: Adapter, data: bytes) -> AdapterInfo:
    return AdapterInfo(id=adapter_id, method=adapter.method, rank=adapter.rank, bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), description=adapter.description, tenant=tenant)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
