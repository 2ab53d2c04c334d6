"""The block pool and the per-sequence block tables, as the scheduler sees them (plain Python, no torch).

Block 0 is the null block: never handed out, always zero; the runner pads block tables with it. Every other
block is either referenced (by the running sequences whose tables hold it; `ref[b]` counts them) or free.
Free blocks sit in one LRU queue: blocks never used first, then blocks released by finished sequences in
the order they were released (a sequence releases its blocks tail first, so a prompt's last blocks go before
its first ones — the first ones are the prefix other requests share). A free block whose hash is known still
holds that prefix's K/V and can be taken back by a hit until the queue hands it out again.

A full block's hash (server.kv.hashing) is registered once its K/V are written (`publish`). A later sequence
with the same chain — same namespace (adapter version, salt) and same tokens — references it instead of
computing it (`hits`). Blocks of a failed sequence are unregistered and zeroed before reuse (`release` with
`poisoned`), and `drop` unregisters every block of a deleted adapter.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (block 0 is the null block)")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))  # LRU first
        self.hash_of: dict[int, bytes] = {}  # registered full blocks: block -> hash
        self.block_of: dict[bytes, int] = {}  # hash -> block
        self.owner_of: dict[int, str] = {}  # registered block -> the adapter (`tenant/id`) that computed it
        self.used_ever = 1  # blocks [1, used_ever) have been handed out at least once
        self.to_zero: list[int] = []  # fresh or poisoned blocks the runner must zero before the next step
        self.hit_tokens = self.query_tokens = 0  # prefix cache counters (prompt tokens looked up / found)

    # ---- capacity ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by running sequences (the null block not counted)."""
        return self.num_blocks - 1 - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- prefix hits ------------------------------------------------------------------------------
    def hits(self, hashes: list[bytes], limit: int) -> list[int]:
        """The registered blocks of the longest prefix of `hashes` (at most `limit` blocks); not referenced yet."""
        found = []
        if self.caching:
            for h in hashes[:limit]:
                b = self.block_of.get(h)
                if b is None:
                    break
                found.append(b)
        return found

    def can_take(self, hits: list[int], n_new: int) -> bool:
        """Could `hits` be referenced and `n_new` fresh blocks allocated now?"""
        reclaimed = sum(1 for b in hits if b in self.free)  # hits that are free no longer count as free
        return self.num_free - reclaimed >= n_new

    def take(self, hits: list[int], n_new: int) -> list[int]:
        """Reference `hits` and allocate `n_new` blocks; returns hits + new blocks. Check `can_take` first."""
        for b in hits:
            self.ref[b] += 1
            self.free.pop(b, None)
        return hits + [self._allocate() for _ in range(n_new)]

    def _allocate(self) -> int:
        b, _ = self.free.popitem(last=False)  # least recently used
        self._unregister(b)
        self.ref[b] = 1
        if b >= self.used_ever:
            self.used_ever = b + 1
            self.to_zero.append(b)  # never written: may hold anything (the pool is torch.empty)
        return b

    # ---- release ----------------------------------------------------------------------------------
    def release(self, blocks: list[int], poisoned: bool = False) -> None:
        """Drop one reference to each of `blocks` (a sequence's table); tail first into the LRU queue.
        `poisoned`: the sequence failed and its K/V may be NaN — unregister the blocks, zero the unshared ones."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if poisoned:
                self._unregister(b)
            if self.ref[b] == 0:
                self.free[b] = None
                if poisoned:
                    self.to_zero.append(b)

    def publish(self, block: int, h: bytes, owner: str | None) -> None:
        """Register a full block whose K/V are written (`owner`: the adapter `tenant/id`, None for the base
        model). A hash already registered keeps its block."""
        if not self.caching or h in self.block_of or block in self.hash_of:
            return
        self.block_of[h], self.hash_of[block] = block, h
        if owner is not None:
            self.owner_of[block] = owner

    def drop(self, owner: str) -> int:
        """Unregister every block computed by adapter `owner` (`tenant/id`, any version: it was deleted);
        returns how many."""
        mine = [b for b, o in self.owner_of.items() if o == owner]
        for b in mine:
            self._unregister(b)
        return len(mine)

    def _unregister(self, b: int) -> None:
        h = self.hash_of.pop(b, None)
        if h is not None:
            del self.block_of[h]
            self.owner_of.pop(b, None)

    def take_to_zero(self) -> list[int]:
        out, self.to_zero = self.to_zero, []
        return out

    @property
    def cached_blocks(self) -> int:
        return len(self.hash_of)
