"""The identity of a full block of KV: a hash chain over (parent hash, the block's token ids), seeded by a
namespace that names what computed the K/V.

The namespace is the adapter version — `tenant/id` and the sha256 of its file — or the base model, plus an
optional `cache_salt` from the request. Two adapters (or two versions of one) never share a namespace, so
the same prompt under each gets its own blocks; the base model's namespace is shared by every tenant unless a
request brings a salt. sha256 (not Python's hash) because a collision would serve someone else's K/V.
"""

from __future__ import annotations

import hashlib
from array import array

from server.sequence import AdapterKey

BASE = b"svdserve-kv/1 base"


def namespace(adapter_key: AdapterKey | None, salt: str | None = None) -> bytes:
    """The root of a sequence's hash chain: the adapter version (or the base model) and the salt."""
    who = BASE if adapter_key is None else "\x00".join(("svdserve-kv/1 adapter", *adapter_key)).encode()
    h = hashlib.sha256(who)
    if salt is not None:
        h.update(b"\x00salt\x00" + salt.encode("utf-8", "surrogatepass"))
    return h.digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block whose predecessor's hash (or the namespace, for the first) is `parent`."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def chain(root: bytes, token_ids: list[int], block_size: int, known: list[bytes]) -> list[bytes]:
    """Extend `known` (the first hashes of this chain) to every full block of `token_ids`; returns `known`."""
    for i in range(len(known), len(token_ids) // block_size):
        parent = known[i - 1] if i else root
        known.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return known
