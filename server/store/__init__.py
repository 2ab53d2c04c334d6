"""The adapter store: an interface (`Store`, base.py) with two backends — a local directory per tenant
(`LocalStore`, local.py, the default) and S3-compatible object storage with the version index in the tenants'
database and a bounded local disk cache (`S3Store`, s3.py and cache.py). `open_store` picks one from --store."""

from server.store.base import (DEFAULT_TENANT, AdapterInfo, AdapterNotFound, InvalidAdapterId, ParsedCache,
                               StorageLimit, StorageQuotaExceeded, Store, StoreCounters, StoredAdapter, StoreFull,
                               StoreNotWritable, StoreUnavailable, adapter_nbytes, check_id, qualified, split_name)
from server.store.local import SIDECAR, SUFFIX, AdapterStore, LocalStore, Upload, check_writable
from server.store.open import is_s3_url, open_store

__all__ = ["DEFAULT_TENANT", "SIDECAR", "SUFFIX", "AdapterInfo", "AdapterNotFound", "AdapterStore", "InvalidAdapterId",
           "LocalStore", "ParsedCache", "StorageLimit", "StorageQuotaExceeded", "Store", "StoreCounters",
           "StoreFull", "StoreNotWritable", "StoreUnavailable", "StoredAdapter", "Upload", "adapter_nbytes",
           "check_id", "check_writable", "is_s3_url", "open_store", "qualified", "split_name"]
