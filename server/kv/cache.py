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
    """The decode group's K/V as dense rows, kept across steps while the group stays the same.

    Gathering every row's blocks in every layer of every decode step cost about a fifth of decode throughput
    on the 2-core CPU (batch 32, 128-token contexts; bench/engine.py). The workspace gathers once, when the
    decode group changes (a sequence joins, leaves, or outgrows the workspace), and from then on each step
    writes its new K/V into both the pool (the store of record: prefix cache, preemption) and the workspace,
    which attention reads as it read the dense cache before the pool existed. Layout per layer
    [KV, rows, cap, hd] (a gather lands in it without a permute); its size follows the running sequences,
    rows × their longest context, not max_batch_size × max_model_len.
    """

    SLACK = 64  # positions of room beyond the longest context when (re)built

    def __init__(self, cache: PagedKVCache, max_len: int):
        self.cache, self.max_len = cache, max_len
        self.key: object = None
        self.k = self.v = None
        self.cap = 0
        self.rebuilds = 0

    def prepare(self, key: object, table: torch.Tensor, length: int) -> None:
        """Make the workspace hold rows `table` ([B, nb] block tables) up to `length` positions. `key` names
        the group; the same key as the last call means the same sequences, each one token further."""
        B = table.shape[0]
        if key is not None and key == self.key and self.k is not None and self.k.shape[2] == B and length <= self.cap:
            return
        bs = self.cache.block_size
        cap = min(-(-max(length + self.SLACK, length * 5 // 4) // bs) * bs, -(-self.max_len // bs) * bs)
        nb = cap // bs
        padded = torch.zeros(B, nb, dtype=torch.long, device=table.device)  # the null block beyond each table
        padded[:, :table.shape[1]] = table[:, :nb]
        flat = padded.reshape(-1)
        L, KV, hd = self.cache.k.shape[0], self.cache.n_kv, self.cache.head_dim
        self.k = torch.empty(L, KV, B, cap, hd, dtype=self.cache.k.dtype, device=self.cache.device)
        self.v = torch.empty_like(self.k)
        for i in range(L):  # every position in [0, cap) gets finite values: a block's, or the null block's zeros
            torch.index_select(self.cache.k[i], 1, flat, out=self.k[i].view(KV, B * nb, bs, hd))
            torch.index_select(self.cache.v[i], 1, flat, out=self.v[i].view(KV, B * nb, bs, hd))
        self.key, self.cap = key, cap
        self.rebuilds += 1

    def invalidate(self) -> None:
        self.key = None

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """pos: [B] each row's position; k, v: [B, KV, hd]."""
        rows = torch.arange(pos.shape[0], device=pos.device)
        self.k[layer][:, rows, pos] = k.transpose(0, 1)
        self.v[layer][:, rows, pos] = v.transpose(0, 1)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V: [B, KV, length, hd] views."""
        return self.k[layer][:, :, :length].transpose(0, 1), self.v[layer][:, :, :length].transpose(0, 1)
