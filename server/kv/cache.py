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
