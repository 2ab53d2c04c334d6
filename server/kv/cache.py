"""The paged KV tensors (the runner's half of the cache).

Layout per layer: K and V of shape [n_kv_heads, num_blocks, block_size, head_dim] (all layers in one tensor
each, layer first). Heads outermost is what makes a decode step's gather cheap: `index_select` over the block
axis of one head gives the rows' blocks back to back, so the gathered [KV, B, L, hd] tensor is viewed as
[B, KV, L, hd] without a second copy, and SDPA reads it as it would a dense cache (bench/engine.py measured
this against a [blocks, block_size, KV, hd] layout, which needs a permuting copy, and against
flex_attention, which needs torch.compile with a C++ toolchain on the CPU).

The tensors are torch.empty: pages are committed only when written, so a large budget costs nothing until it
is used. Block 0 (the null block, table padding) is zeroed here; fresh blocks are zeroed by the runner
before their first step (`zero`), since masked positions still take part in softmax·V (NaN·0 is NaN).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, n_kv, num_blocks, block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.n_kv, self.head_dim = num_blocks, block_size, n_kv, head_dim
        self.device = device
        self.zero([0])

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def zero(self, blocks: list[int]) -> None:
        if blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            self.k.index_fill_(2, idx, 0)
            self.v.index_fill_(2, idx, 0)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: [N] flat positions (block * block_size + offset); k, v: [N, KV, hd]."""
        n = self.num_blocks * self.block_size
        self.k[layer].view(self.n_kv, n, self.head_dim).index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].view(self.n_kv, n, self.head_dim).index_copy_(1, slots, v.transpose(0, 1))

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """table: [B, nb] block ids -> K, V: [B, KV, nb * block_size, hd] (one copy, then a view)."""
        B, nb = table.shape
        flat = table.reshape(-1)
        shape = (self.n_kv, B, nb * self.block_size, self.head_dim)
        k = self.k[layer].index_select(1, flat).view(shape).transpose(0, 1)
        v = self.v[layer].index_select(1, flat).view(shape).transpose(0, 1)
        return k, v


class DecodeWorkspace:
    """The decode group's K/V as dense rows, kept across steps.

    Gathering every row's blocks in every layer of every decode step cost about a fifth of decode throughput
    on the 2-core CPU (batch 32, 128-token contexts; bench/engine.py). The workspace keeps one dense row per
    decoding sequence instead: each step writes its new K/V into both the pool (the store of record: prefix
    cache, preemption) and the workspace, which attention reads as it read the dense cache before the pool
    existed. When the group changes, a sequence that stays keeps its row (rows above the new batch size move
    down into the holes, as the dense cache's compaction did), and only a new sequence's blocks are gathered
    into its row; everything is gathered again only when the workspace must grow. Layout per layer
    [KV, rows, cap, hd] (a gather lands in it without a permute). It holds contexts up to MAX_LEN positions
    only, so it never costs more than rows × MAX_LEN tokens of K/V: a longer sequence gathers its blocks in
    every step instead, where attention over its long context costs more than the gather anyway.
    """

    SLACK = 64  # positions of room beyond the longest context when (re)built
    MAX_LEN = 512  # longest context kept in the workspace

    def __init__(self, cache: PagedKVCache, max_len: int):
        self.cache, self.max_len = cache, max_len
        self.k = self.v = None
        self.cap = 0
        self.row_of: dict[object, int] = {}  # sequence key -> its row
        self._moves: list[tuple[int, int]] = []  # (src row, dst row) to apply at the next prepare
        self._new: list[int] = []  # rows whose sequences are new: gathered at the next prepare
        self.rebuilds = self.gathered_rows = 0

    def assign(self, keys: list[object]) -> list[int]:
        """Rows 0..len(keys)-1 for the decode group `keys` (one hashable per sequence); returns each key's row.
        The caller orders its batch by these rows and calls `prepare` before the forward."""
        B, wanted = len(keys), set(keys)
        kept = {k: r for k, r in self.row_of.items() if k in wanted}
        holes = sorted(set(range(B)) - {r for r in kept.values() if r < B})
        self._moves, self._new = [], []
        for k, r in sorted(kept.items(), key=lambda kr: kr[1]):
            if r >= B:
                kept[k] = holes.pop(0)
                self._moves.append((r, kept[k]))
        for k in keys:
            if k not in kept:
                kept[k] = holes.pop(0)
                self._new.append(kept[k])
        self.row_of = kept
        return [kept[k] for k in keys]

    def invalidate(self) -> None:
        """Forget every row: the next prepare gathers them all."""
        self.row_of, self._moves, self._new = {}, [], []
        self.k = None

    def prepare(self, table: torch.Tensor, length: int) -> None:
        """table: [B, nb] the block tables of rows 0..B-1; make the workspace hold them up to `length`."""
        B = table.shape[0]
        if self.k is None or length > self.cap or B > self.k.shape[2]:
            self._allocate(B, length)
            self._gather(table, list(range(B)))
            self.rebuilds += 1
        else:
            for src, dst in self._moves:
                self.k[:, :, dst] = self.k[:, :, src]
                self.v[:, :, dst] = self.v[:, :, src]
            if self._new:
                self._gather(table, self._new)
        self._moves, self._new = [], []

    def _allocate(self, B: int, length: int) -> None:
        bs = self.cache.block_size
        limit = min(self.MAX_LEN, self.max_len)
        self.cap = min(-(-max(length + self.SLACK, length * 5 // 4) // bs) * bs, -(-limit // bs) * bs)
        rows = max(B, 8)
        shape = (self.cache.k.shape[0], self.cache.n_kv, rows, self.cap, self.cache.head_dim)
        self.k = torch.empty(shape, dtype=self.cache.k.dtype, device=self.cache.device)
        self.v = torch.empty_like(self.k)

    def _gather(self, table: torch.Tensor, rows: list[int]) -> None:
        """Copy the blocks of `rows` into their rows; every position in [0, cap) gets finite values (a block's,
        or the null block's zeros beyond its table)."""
        bs, KV, hd = self.cache.block_size, self.cache.n_kv, self.cache.head_dim
        nb, n = self.cap // bs, len(rows)
        idx = torch.tensor(rows, dtype=torch.long, device=table.device)
        padded = torch.zeros(n, nb, dtype=torch.long, device=table.device)
        padded[:, :min(nb, table.shape[1])] = table[idx, :nb]
        flat = padded.reshape(-1)
        for i in range(self.cache.k.shape[0]):
            for src, dst in ((self.cache.k, self.k), (self.cache.v, self.v)):
                got = src[i].index_select(1, flat).view(KV, n, self.cap, hd)
                if n == dst.shape[2]:
                    dst[i].copy_(got)
                else:
                    dst[i].index_copy_(1, idx, got)
        self.gathered_rows += n

    def index(self, pos: torch.Tensor) -> torch.Tensor:
        """The flat (row · cap + position) index of rows 0..B-1 at positions pos [B], for `write` (valid until
        the next `prepare`)."""
        return torch.arange(pos.shape[0], device=pos.device) * self.cap + pos

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """index: [B] from `index(pos)`; k, v: [B, KV, hd]. One index_copy_ over the flattened (row, position)
        axis, with the index made once per step (not per layer); on a quiet host it costs the same as an
        advanced-index put (7.4 against 7.8 us a layer at batch 32)."""
        KV, R, hd = self.k.shape[1], self.k.shape[2], self.k.shape[4]
        self.k[layer].view(KV, R * self.cap, hd).index_copy_(1, index, k.transpose(0, 1))
        self.v[layer].view(KV, R * self.cap, hd).index_copy_(1, index, v.transpose(0, 1))

    def read(self, layer: int, B: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of rows 0..B-1: [B, KV, length, hd] views."""
        return (self.k[layer][:, :B, :length].transpose(0, 1), self.v[layer][:, :B, :length].transpose(0, 1))
