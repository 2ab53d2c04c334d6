"""Our own forward for Llama-family decoders (Llama, SmolLM, Mistral without sliding window, Qwen2),
built from the loaded Hugging Face model's modules, over the engine's paged KV cache (server.kv).

The HF modules supply the weights and the small pieces (embedding, RMSNorms, activation, rotary
frequencies, LM head); attention, the cache and the layer loop are here. The adapted projections are
called as `proj(x, batch)`, so each row's adapter reaches them explicitly.

KV cache: a pool of blocks (server.kv.cache.PagedKVCache); each sequence reads and writes its own blocks
through its block table. A step has up to two groups of sequences: the *decode* group, one token per
sequence, attending through the decode workspace (or its gathered blocks) with a per-row length mask; and
the *prefill* group, prompt chunks that each continue a sequence's cached context (0 for a fresh prompt: then
it attends over its own K/V only, with the causal mask, without reading the cache). A step with both runs
them as ONE forward (`mixed`): every token is a row of the projections — the decode tokens, then the chunks'
tokens back to back — and only attention splits by group, so a prompt chunk costs its rows in the step's
matmuls rather than a second pass over every layer. Pad positions are never written to the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.methods import AdapterBatch
from server.kv.blocks import NULL_BLOCK
from server.kv.cache import DecodeWorkspace, PagedKVCache

SUPPORTED = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rope_table(rotary: nn.Module, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] from the HF rotary module (so rope type and scaling are its own)."""
    pos = torch.arange(max_len, device=device)[None]
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, pos)
    return cos[0], sin[0]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; cos, sin: broadcastable to it ([B or 1, 1, T, hd])
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def heads(x: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    # x: [B, T, n*hd] -> [B, n, T, hd]
    return x.view(x.shape[0], x.shape[1], n, hd).transpose(1, 2)


def padded_table(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, nb] block tables padded with the null block."""
    nb = max(len(t) for t in tables)
    return torch.tensor([t + [NULL_BLOCK] * (nb - len(t)) for t in tables], dtype=torch.long, device=device)


def fused_group(*mods: nn.Module):
    """The FusedLinear (adapters/fused.py) serving exactly `mods`, in order, or None."""
    g = getattr(mods[0], "fused", None)
    return g if g is not None and g.members == list(mods) else None


def project(mods: tuple[nn.Module, ...], x: torch.Tensor, batch: AdapterBatch | None) -> list[torch.Tensor]:
    """The outputs of projections `mods` that all read x: one fused matmul when they form a group."""
    g = fused_group(*mods)
    if g is None:
        return [m(x, batch) for m in mods]
    y = g(x, batch)
    return list(y.split(g.sizes, dim=-1)) if len(mods) > 1 else [y]


def mlp(m: nn.Module, x: torch.Tensor, batch: AdapterBatch | None) -> torch.Tensor:
    # x: [B, T, D] -> [B, T, D]
    gate, up = project((m.gate_proj, m.up_proj), x, batch)
    return project((m.down_proj,), m.act_fn(gate) * up, batch)[0]


class DecoderModel:
    """Prefill and decode over an HF Llama-family model whose target projections are AdaptedLinear, with a
    paged KV cache of `num_blocks` blocks of `block_size` tokens and positions up to `max_len`."""

    def __init__(self, hf: nn.Module, num_blocks: int, block_size: int, max_len: int):
        cfg = hf.config
        _check_supported(cfg, max_len)
        inner = hf.model
        self.embed, self.layers, self.norm, self.lm_head = inner.embed_tokens, list(inner.layers), inner.norm, hf.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scale = attn.scaling
        w = self.embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.cos, self.sin = (t.to(self.dtype) for t in rope_table(inner.rotary_emb, max_len, self.device))
        self.cache = PagedKVCache(len(self.layers), num_blocks, block_size, self.n_kv, self.head_dim, self.dtype,
                                  self.device)
        self.workspace = DecodeWorkspace(self.cache, max_len)
        self.block_size, self.max_len = block_size, max_len

    def qkv(self, a: nn.Module, x: torch.Tensor, cos, sin, batch) -> tuple[torch.Tensor, ...]:
        # x: [B, T, D] -> q: [B, H, T, hd], k, v: [B, KV, T, hd] (rotary applied to q, k)
        q, k, v = project((a.q_proj, a.k_proj, a.v_proj), x, batch)
        q, k, v = heads(q, self.n_heads, self.head_dim), heads(k, self.n_kv, self.head_dim), heads(v, self.n_kv, self.head_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def out(self, a: nn.Module, o: torch.Tensor, batch) -> torch.Tensor:
        # o: [B, H, T, hd] -> [B, T, D]
        B, _, T, _ = o.shape
        return project((a.o_proj,), o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), batch)[0]

    def _layers(self, h: torch.Tensor, cos, sin, batch: AdapterBatch | None, attend) -> torch.Tensor:
        """h: [B, T, D] through every layer; attend(layer index, q, k, v) -> o does the cache and attention."""
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self.qkv(a, layer.input_layernorm(h), cos, sin, batch)
            h = h + self.out(a, attend(i, q, k, v), batch)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h), batch)
        return h

    def slots(self, table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat cache positions (block * block_size + offset) of positions `pos` of table rows `rows`."""
        bs = self.block_size
        return table[rows, pos // bs] * bs + pos % bs

    def prefill(self, chunks: list[list[int]], ctx: list[int], tables: list[list[int]], batch: AdapterBatch | None,
                keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """chunks: each sequence's prompt chunk (token ids); ctx: each one's tokens already in the cache (the
        chunk's first position); tables: each one's block table, covering ctx + its chunk. The chunks' tokens
        are the rows of the projections back to back (no padding): `batch` has a row per token. Writes the
        chunks' K/V, returns logits [C, V] (float32) at each chunk's last token. `keep`, when given, receives
        for each of its keys (a chunk) its final normed hidden states [len, D] (prompt logprobs: `logits_of`
        them in chunks, never a [T, V] tensor per prompt at once)."""
        group = _Chunks(self, chunks, ctx, tables)
        return self._forward(group.tokens, group.cos, group.sin, group.attend, batch, group.last(0), keep, group, 0)

    def logits_of(self, normed: torch.Tensor) -> torch.Tensor:
        """[T, D] normed hidden states -> [T, V] float32 logits."""
        return self.lm_head(normed).float()

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, table: torch.Tensor,
               batch: AdapterBatch | None, assigned: bool = False, n_ws: int | None = None) -> torch.Tensor:
        """tokens, pos: [B] each row's input token and its position; table: [B, nb] block tables covering
        pos + 1 tokens (padded with the null block). Rows 0..n_ws-1 (default: all) attend through the decode
        workspace — `assigned`: they are in the order `self.workspace.assign` gave for this step's sequences
        (their workspace rows are kept), else it is gathered afresh; the rows after them (long contexts,
        beyond DecodeWorkspace.MAX_LEN) gather their blocks in every layer. Returns logits [B, V] (float32)."""
        rows = _DecodeRows(self, pos, table, assigned, n_ws)
        return self._forward(tokens, rows.cos, rows.sin, rows.attend, batch, None)

    def mixed(self, tokens: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, assigned: bool, n_ws: int,
              chunks: list[list[int]], ctx: list[int], tables: list[list[int]], batch: AdapterBatch | None,
              keep: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows and prompt chunks in one forward (chunked prefill beside running streams): the first
        five arguments are `decode`'s, the next three `prefill`'s; the rows of the projections are the B
        decode tokens, then the chunks' tokens back to back, so `batch` has B + Σ len(chunk) rows. Attention
        runs per group as in `decode` and `prefill`. Returns the decode rows' logits [B, V] and the chunks'
        last-token logits [C, V] (float32); `keep` as in `prefill`."""
        B = tokens.shape[0]
        rows, group = _DecodeRows(self, pos, table, assigned, n_ws), _Chunks(self, chunks, ctx, tables)

        def attend(i: int, q, k, v):  # q: [N, H, 1, hd], k, v: [N, KV, 1, hd]
            return torch.cat([rows.attend(i, q[:B], k[:B], v[:B]), group.attend(i, q[B:], k[B:], v[B:])])

        logits = self._forward(torch.cat([tokens, group.tokens]), torch.cat([rows.cos, group.cos]),
                               torch.cat([rows.sin, group.sin]), attend, batch,
                               torch.cat([torch.arange(B, device=self.device), group.last(B)]), keep, group, B)
        return logits[:B], logits[B:]

    def _forward(self, tokens: torch.Tensor, cos, sin, attend, batch: AdapterBatch | None,
                 last: torch.Tensor | None, keep: dict[int, torch.Tensor] | None = None,
                 group: _Chunks | None = None, offset: int = 0) -> torch.Tensor:
        """tokens: [N] one per row; the logits [len(last), V] of rows `last` (None: every row); the kept
        chunks' normed hidden states (rows offset + group.starts[j] ...) into `keep`."""
        h = self._layers(self.embed(tokens[:, None]), cos, sin, batch, attend)[:, 0]  # [N, D]
        for j in keep or {}:
            s = offset + group.starts[j]
            keep[j] = self.norm(h[s:s + group.lens[j]])
        if last is not None:
            h = h.index_select(0, last)
        return self.lm_head(self.norm(h)).float()


class _DecodeRows:
    """A step's decode rows (one token each): rotary rows, and attention through the decode workspace for rows
    0..n_ws-1 (contexts up to its MAX_LEN) and through a per-layer block gather for the rows after them."""

    def __init__(self, m: DecoderModel, pos: torch.Tensor, table: torch.Tensor, assigned: bool, n_ws: int | None):
        B = pos.shape[0]
        self.m, self.pos, self.n_ws = m, pos, B if n_ws is None else n_ws
        n_ws = self.n_ws
        if not assigned:
            m.workspace.invalidate()
        self.short = _Rows(m, pos[:n_ws], table[:n_ws]) if n_ws else None
        self.long = _Rows(m, pos[n_ws:], table[n_ws:], gather=True) if n_ws < B else None
        if self.short is not None:
            m.workspace.prepare(table[:n_ws], self.short.L)
            self.ws_index = m.workspace.index(pos[:n_ws])
        self.slots = m.slots(table, torch.arange(B, device=m.device), pos)
        self.cos, self.sin = m.cos[pos][:, None, None], m.sin[pos][:, None, None]  # [B, 1, 1, hd]

    def attend(self, i: int, q, k, v) -> torch.Tensor:
        m, n_ws = self.m, self.n_ws
        m.cache.write(i, self.slots, k[:, :, 0], v[:, :, 0])
        parts = []
        if self.short is not None:
            m.workspace.write(i, self.ws_index, k[:n_ws, :, 0], v[:n_ws, :, 0])
            kc, vc = m.workspace.read(i, n_ws, self.short.L)  # [n_ws, KV, L, hd]
            parts.append(self.short.attend(q[:n_ws], kc, vc))
        if self.long is not None:
            kc, vc = m.cache.gather(i, self.long.table)
            parts.append(self.long.attend(q[n_ws:], kc, vc))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Chunks:
    """A step's prompt chunks as rows back to back: their tokens, rotary rows and cache positions, and attention.

    A chunk that starts its prompt (context 0) attends over its own K/V with the causal mask; several such
    chunks attend together, right-padded to the longest (pads are copies of real rows, never written to the
    cache, and never seen by a real query). A chunk that continues a cached context attends over its blocks
    in the cache (after this step's K/V are written) with a position mask, alone: it never makes the fresh
    chunks read the cache, nor pads to another chunk's length."""

    def __init__(self, m: DecoderModel, chunks: list[list[int]], ctx: list[int], tables: list[list[int]]):
        dev = m.device
        self.m, self.lens = m, [len(c) for c in chunks]
        self.starts = [sum(self.lens[:j]) for j in range(len(chunks))]
        self.tokens = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)
        row = torch.tensor([j for j, n in enumerate(self.lens) for _ in range(n)], dtype=torch.long, device=dev)
        pos = torch.tensor([p for c, n in zip(ctx, self.lens) for p in range(c, c + n)], dtype=torch.long, device=dev)
        self.slots = m.slots(padded_table(tables, dev), row, pos)
        self.cos, self.sin = m.cos[pos][:, None, None], m.sin[pos][:, None, None]  # [n, 1, 1, hd]
        fresh = [j for j, c in enumerate(ctx) if c == 0]
        self.alone: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []  # (start, end, table, mask)
        for j, c in enumerate(ctx):
            if c > 0 or len(fresh) == 1 and j == fresh[0]:
                self.alone.append((self.starts[j], self.starts[j] + self.lens[j], *self._cached(tables[j], c, j)))
        self.padded = self._padding(fresh) if len(fresh) > 1 else None

    def _cached(self, table: list[int], c: int, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A continuing chunk's block table [1, nb] and mask [1, 1, len, L] (key p is visible to the chunk's
        t-th query when p <= c + t); (None, None) for a fresh one."""
        if c == 0:
            return None, None
        m, n = self.m, self.lens[j]
        L = len(table) * m.block_size
        hidden = torch.arange(L, device=m.device)[None] > (c + torch.arange(n, device=m.device))[:, None]
        mask = torch.zeros(1, 1, n, L, dtype=m.dtype, device=m.device).masked_fill_(hidden[None, None], float("-inf"))
        return torch.tensor([table], dtype=torch.long, device=m.device), mask

    def _padding(self, fresh: list[int]) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh chunks padded together: (count, T, rows [count·T] to take (a pad repeats its chunk's last
        row), where their real rows are in the padded block, which rows those are)."""
        T, dev = max(self.lens[j] for j in fresh), self.m.device
        take, real, dst = [], [], []
        for f, j in enumerate(fresh):
            s, n = self.starts[j], self.lens[j]
            take += list(range(s, s + n)) + [s + n - 1] * (T - n)
            real += range(f * T, f * T + n)
            dst += range(s, s + n)
        as_t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        return len(fresh), T, as_t(take), as_t(real), as_t(dst)

    def last(self, offset: int) -> torch.Tensor:
        """Rows (after `offset` rows before the chunks) of each chunk's last token."""
        return torch.tensor([offset + s + n - 1 for s, n in zip(self.starts, self.lens)], device=self.m.device)

    def attend(self, i: int, q, k, v) -> torch.Tensor:
        """q: [n, H, 1, hd], k, v: [n, KV, 1, hd] (this layer's, rotary applied) -> o: [n, H, 1, hd]."""
        m = self.m
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [n, heads, hd]
        m.cache.write(i, self.slots, k, v)
        out = torch.empty_like(q)
        sdpa = lambda q_, k_, v_, mask: F.scaled_dot_product_attention(  # noqa: E731
            q_, k_, v_, attn_mask=mask, is_causal=mask is None, scale=m.scale, enable_gqa=True)
        for s, e, table, mask in self.alone:
            heads_first = lambda x: x[s:e].transpose(0, 1)[None]  # noqa: E731  [1, heads, len, hd]
            kc, vc = (heads_first(k), heads_first(v)) if table is None else m.cache.gather(i, table)
            out[s:e] = sdpa(heads_first(q), kc, vc, mask)[0].transpose(0, 1)
        if self.padded is not None:
            C, T, take, real, dst = self.padded
            pad = lambda x: x.index_select(0, take).view(C, T, *x.shape[1:]).transpose(1, 2)  # noqa: E731
            o = sdpa(pad(q), pad(k), pad(v), None).transpose(1, 2).reshape(C * T, *q.shape[1:])
            out.index_copy_(0, dst, o.index_select(0, real))
        return out.unsqueeze(2)


class _Rows:
    """Decode rows that attend together: their length L and additive mask [b, 1, 1, L], built once per step
    (a bool mask is converted by SDPA in every layer)."""

    def __init__(self, m: DecoderModel, pos: torch.Tensor, table: torch.Tensor, gather: bool = False):
        self.m, self.table = m, table
        self.L = table.shape[1] * m.block_size if gather else int(pos.max()) + 1
        visible = torch.arange(self.L, device=m.device)[None] <= pos[:, None]  # [b, L]
        self.mask = torch.zeros(pos.shape[0], 1, 1, self.L, dtype=m.dtype, device=m.device)
        self.mask.masked_fill_(~visible[:, None, None], float("-inf"))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.m.scale, enable_gqa=True)


def _check_supported(cfg, max_len: int) -> None:
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"model type {cfg.model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
        raise ValueError(f"sliding-window attention ({window}) is not supported; use max_model_len <= {window}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE)}")
