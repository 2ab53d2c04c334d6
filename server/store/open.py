"""`open_store`: the backend --store names — `s3://BUCKET/PREFIX` for object storage, anything else a local
directory."""

from __future__ import annotations

from adapters.file import BaseSpec
from server.store.base import DEFAULT_PARSED_CACHE_BYTES, Store


def is_s3_url(store: str) -> bool:
    return store.startswith("s3://")


def open_store(store: str, spec: BaseSpec, *, engine=None, cache_dir: str | None = None,
               cache_bytes: int | None = None, parsed_cache_bytes: int = DEFAULT_PARSED_CACHE_BYTES) -> Store:
    """The store at `store`. The S3 backend needs the tenants' database `engine` (its index) and a disk cache
    directory; the local one needs neither. Raises StoreNotWritable naming what cannot be used."""
    if is_s3_url(store):
        from server.store.cache import DEFAULT_CACHE_BYTES
        from server.store.s3 import S3Store

        if engine is None or cache_dir is None:
            raise ValueError("the S3 store needs the tenants' database and a disk cache directory")
        return S3Store(store, spec, engine, cache_dir, cache_bytes or DEFAULT_CACHE_BYTES, parsed_cache_bytes)
    from server.store.local import LocalStore

    return LocalStore(store, spec, parsed_cache_bytes=parsed_cache_bytes)
