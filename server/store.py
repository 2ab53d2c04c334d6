"""The adapter store: a directory of validated adapter files, `<id>.safetensors`.

Writes go to a temporary file in the same directory, are fsynced and renamed over the old file, so a crash
never leaves a half adapter and a failed upload leaves the store as it was. Replicas of one deployment may
share the directory. An adapter's version is the sha256 of its bytes: the engine keys resident slots by
(id, version), so a request keeps the version it started with while a new one is uploaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass

from adapters.file import Adapter, AdapterFormatError, BaseSpec, parse_adapter

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUFFIX = ".safetensors"


class InvalidAdapterId(ValueError):
    pass


class AdapterNotFound(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} not found"


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    method: str
    rank: int
    bytes: int
    sha256: str
    description: str | None = None


@dataclass(frozen=True)
class StoredAdapter:
    info: AdapterInfo
    adapter: Adapter

    @property
    def version(self) -> str:
        return self.info.sha256


def check_id(adapter_id: str) -> str:
    """Ids are 1–64 characters of [A-Za-z0-9._-] and never a path ('.' and '..' are refused)."""
    if not ID_RE.match(adapter_id) or adapter_id in (".", ".."):
        raise InvalidAdapterId(f"invalid adapter id {adapter_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    return adapter_id


class AdapterStore:
    """Validated adapters on disk, with a small cache of parsed files keyed by (id, sha256)."""

    def __init__(self, root: str, spec: BaseSpec):
        self.root, self.spec = os.path.abspath(root), spec
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()
        self._parsed: dict[str, StoredAdapter] = {}

    def _path(self, adapter_id: str) -> str:
        return os.path.join(self.root, check_id(adapter_id) + SUFFIX)

    def put(self, adapter_id: str, data: bytes) -> tuple[AdapterInfo, bool]:
        """Validate and store; returns (info, created). Raises AdapterFormatError, InvalidAdapterId."""
        path = self._path(adapter_id)
        adapter = parse_adapter(data, self.spec)  # raises before anything is written
        info = _info(adapter_id, adapter, data)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                created = not os.path.exists(path)
                os.replace(tmp, path)
                self._parsed[adapter_id] = StoredAdapter(info, adapter)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(self.root)
        return info, created

    def get(self, adapter_id: str) -> StoredAdapter:
        """The current version of an adapter. Raises AdapterNotFound, InvalidAdapterId."""
        path = self._path(adapter_id)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise AdapterNotFound(adapter_id) from None
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            cached = self._parsed.get(adapter_id)
            if cached is not None and cached.version == digest:
                return cached
        adapter = parse_adapter(data, self.spec)  # another replica may have written it
        stored = StoredAdapter(_info(adapter_id, adapter, data), adapter)
        with self._lock:
            self._parsed[adapter_id] = stored
        return stored

    def delete(self, adapter_id: str) -> None:
        path = self._path(adapter_id)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise AdapterNotFound(adapter_id) from None
            self._parsed.pop(adapter_id, None)
        _fsync_dir(self.root)

    def exists(self, adapter_id: str) -> bool:
        """Whether an adapter of that id is stored (False for an invalid id)."""
        try:
            return os.path.isfile(self._path(adapter_id))
        except InvalidAdapterId:
            return False

    def ids(self) -> list[str]:
        return sorted(n[: -len(SUFFIX)] for n in os.listdir(self.root)
                      if n.endswith(SUFFIX) and ID_RE.match(n[: -len(SUFFIX)]))

    def list(self) -> list[AdapterInfo]:
        out = []
        for adapter_id in self.ids():
            try:
                out.append(self.get(adapter_id).info)
            except (AdapterNotFound, AdapterFormatError):
                continue  # deleted meanwhile, or a foreign file that does not validate
        return out


def _info(adapter_id: str, adapter: Adapter, data: bytes) -> AdapterInfo:
    return AdapterInfo(id=adapter_id, method=adapter.method, rank=adapter.rank, bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), description=adapter.description)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
