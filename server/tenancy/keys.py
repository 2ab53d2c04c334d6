"""API keys: high-entropy random strings with a recognisable prefix, shown once, stored as sha256.

A key carries 256 bits from `secrets`, so a plain (unsalted) sha256 is enough to store it: there is nothing to
brute-force, and an indexed lookup by hash stays O(log n). The hash found is compared once more with
`hmac.compare_digest`, and the admin key from the configuration is compared the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-svd-"
SHOWN_PREFIX_LEN = len(KEY_PREFIX) + 6  # what listings show of a key: "sk-svd-AbCdEf"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def shown_prefix(key: str) -> str:
    return key[:SHOWN_PREFIX_LEN]
