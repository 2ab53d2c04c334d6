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

    def prefill(self, tokens: torch.Tensor, lens: torch.Tensor, ctx: torch.Tensor, table: torch.Tensor,
                batch: AdapterBatch | None, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens: [C, T] right-padded prompt chunks; lens: [C] their lengths; ctx: [C] tokens of each row
        already in the cache (the chunk's first position); table: [C, nb] block tables covering ctx + lens.
        Writes the chunks' K/V, returns logits [C, V] (float32) at each chunk's last token. `keep`, when
        given, receives for each of its keys (a row) the final normed hidden states [lens[row], D] (prompt
        logprobs: `logits_of` them in chunks, never a [T, V] tensor per prompt at once)."""
        chunks = _Chunks(self, lens, ctx, table, tokens.shape[1])
        h = self._layers(self.embed(tokens), chunks.cos, chunks.sin, batch, chunks.attend)  # [C, T, D]
        for j in keep or {}:
            keep[j] = self.norm(h[j, :int(lens[j])])  # [T_j, D]
        h = h[torch.arange(len(lens), device=h.device), lens - 1]  # [C, D]
        return self.lm_head(self.norm(h)).float()

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
        h = self._layers(self.embed(tokens[:, None]), rows.cos, rows.sin, batch, rows.attend)  # [B, 1, D]
        return self.lm_head(self.norm(h[:, 0])).float()

    def mixed(self, tokens: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, assigned: bool, n_ws: int,
              chunk_tokens: torch.Tensor, lens: torch.Tensor, ctx: torch.Tensor, chunk_table: torch.Tensor,
              batch: AdapterBatch | None, keep: dict[int, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows and prompt chunks in one forward (chunked prefill beside running streams). The first
        five arguments are `decode`'s, the next four `prefill`'s; every token is one row of the projections:
        the B decode tokens first, then the chunks' real tokens back to back (no padding), so `batch` has a
        row (slot) per token, B + sum(lens). Attention runs per group as in `decode` and `prefill`. Returns
        the decode rows' logits [B, V] and the chunks' last-token logits [C, V] (float32); `keep` as in
        `prefill`."""
        B = tokens.shape[0]
        rows = _DecodeRows(self, pos, table, assigned, n_ws)
        chunks = _Chunks(self, lens, ctx, chunk_table, chunk_tokens.shape[1])
        flat = torch.cat([tokens, chunk_tokens.flatten().index_select(0, chunks.valid)])  # [N]
        cos = torch.cat([rows.cos, chunks.packed(chunks.cos[:, 0, :, None, None])])  # [N, 1, 1, hd]
        sin = torch.cat([rows.sin, chunks.packed(chunks.sin[:, 0, :, None, None])])

        def attend(i: int, q, k, v):  # q: [N, H, 1, hd], k, v: [N, KV, 1, hd]
            o = rows.attend(i, q[:B], k[:B], v[:B])
            oc = chunks.attend(i, *(chunks.padded(x[B:]) for x in (q, k, v)))  # [C, H, T, hd]
            return torch.cat([o, chunks.packed(oc.transpose(1, 2)).unsqueeze(2)])

        h = self._layers(self.embed(flat[:, None]), cos, sin, batch, attend)[:, 0]  # [N, D]
        starts = B + torch.cumsum(lens, 0) - lens  # each chunk's first row
        for j in keep or {}:
            s = int(starts[j])
            keep[j] = self.norm(h[s:s + int(lens[j])])
        last = torch.cat([torch.arange(B, device=self.device), starts + lens - 1])
        logits = self.lm_head(self.norm(h.index_select(0, last))).float()
        return logits[:B], logits[B:]


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
        self.slots = m.slots(table, torch.arange(B, device=m.device), pos)
        self.cos, self.sin = m.cos[pos][:, None, None], m.sin[pos][:, None, None]  # [B, 1, 1, hd]

    def attend(self, i: int, q, k, v) -> torch.Tensor:
        m, n_ws = self.m, self.n_ws
        m.cache.write(i, self.slots, k[:, :, 0], v[:, :, 0])
        parts = []
        if self.short is not None:
            m.workspace.write(i, self.pos[:n_ws], k[:n_ws, :, 0], v[:n_ws, :, 0])
            kc, vc = m.workspace.read(i, n_ws, self.short.L)  # [n_ws, KV, L, hd]
            parts.append(self.short.attend(q[:n_ws], kc, vc))
        if self.long is not None:
            kc, vc = m.cache.gather(i, self.long.table)
            parts.append(self.long.attend(q[n_ws:], kc, vc))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Chunks:
    """A step's prompt chunks, right-padded to T: rotary rows, the K/V writes (real tokens only) and attention —
    over the chunk's own K/V with the causal mask when every chunk starts a prompt, else over its blocks in the
    cache with a position mask. `padded`/`packed` convert between [C, T] padding and the real tokens back to
    back (the layout of `DecoderModel.mixed`)."""

    def __init__(self, m: DecoderModel, lens: torch.Tensor, ctx: torch.Tensor, table: torch.Tensor, T: int):
        self.m, self.table, self.C, self.T = m, table, lens.shape[0], T
        C, dev = self.C, m.device
        pos = ctx[:, None] + torch.arange(T, device=dev)[None]  # [C, T]
        self.valid = (torch.arange(T, device=dev)[None] < lens[:, None]).flatten().nonzero()[:, 0]  # real tokens
        self.dense = self.valid.shape[0] == C * T  # no padding: padded/packed are views
        self.slots = m.slots(table, self.valid // T, pos.flatten()[self.valid])
        pos = pos.clamp(max=m.max_len - 1)  # pad positions only
        self.cos, self.sin = m.cos[pos][:, None], m.sin[pos][:, None]  # [C, 1, T, hd]
        self.fresh = not bool(ctx.any())
        if not self.fresh:  # key j is visible to query t of row c when j <= its position
            L = table.shape[1] * m.block_size
            self.mask = torch.zeros(C, 1, T, L, dtype=m.dtype, device=dev)
            hidden = torch.arange(L, device=dev)[None, None, None] > pos[:, None, :, None]  # [C, 1, T, L]
            self.mask.masked_fill_(hidden, float("-inf"))

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """[C, T, ...] -> [n real tokens, ...]."""
        flat = x.reshape(self.C * self.T, *x.shape[2:])
        return flat if self.dense else flat.index_select(0, self.valid)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """[n, heads, 1, hd] packed rows -> [C, heads, T, hd] (pads are zeros)."""
        x = x[:, :, 0]
        if not self.dense:
            full = x.new_zeros(self.C * self.T, *x.shape[1:])
            x = full.index_copy_(0, self.valid, x)
        return x.reshape(self.C, self.T, *x.shape[1:]).transpose(1, 2)

    def attend(self, i: int, q, k, v) -> torch.Tensor:
        m = self.m
        flat = lambda x: self.packed(x.transpose(1, 2))  # noqa: E731  [n, KV, hd]
        m.cache.write(i, self.slots, flat(k), flat(v))
        if self.fresh:  # right padding + causal mask: a real token never sees a pad token
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=m.scale, enable_gqa=True)
        kc, vc = m.cache.gather(i, self.table)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=self.mask, scale=m.scale, enable_gqa=True)


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
