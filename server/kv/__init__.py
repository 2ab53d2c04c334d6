"""Paged KV cache: a pool of fixed-size blocks, a block table per sequence, and prefix reuse of full blocks.

* `blocks.BlockManager` (plain Python, no torch): which blocks are free, who references each block, and which
  full blocks hold a known prefix (hash chain) — the scheduler's half.
* `hashing`: the hash chain of full blocks, namespaced by the adapter version (or the base model) and an
  optional per-request salt, so KV computed under one adapter version is never served to another.
* `cache.PagedKVCache` (torch): the block tensors the model reads and writes — the runner's half.
* `budget`: how many blocks a memory budget buys.
"""

from server.kv.blocks import BlockManager
from server.kv.hashing import block_hash, namespace

__all__ = ["BlockManager", "block_hash", "namespace"]
