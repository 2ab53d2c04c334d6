"""Our own forward for Llama-family decoders (Llama, SmolLM, Mistral without sliding window, Qwen2),
built from the loaded Hugging Face model's modules, with an engine-managed KV cache.

The HF modules supply the weights and the small pieces (embedding, RMSNorms, activation, rotary
frequencies, LM head); attention, the cache and the layer loop are here. The adapted projections are
called as `proj(x, batch)`, so each row's adapter reaches them explicitly.

KV cache: per layer, K and V of shape [rows, n_kv_heads, max_len, head_dim], allocated once. A sequence
owns one row while it runs. Prefill writes a batch of right-padded prompts into consecutive rows; decode
feeds one token per row for rows 0..B-1 and attends over cache[:B, :, :L] with a per-row length mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.methods import AdapterBatch

SUPPORTED = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class KVCache:
    """K and V for every layer: [n_layers, rows, n_kv_heads, max_len, head_dim] each.

    Allocated with torch.empty (pages are only committed when written) and zeroed lazily up to a
    watermark: every read position below L must hold finite numbers (masked garbage NaNs would still
    poison softmax·V), and every write position p is preceded by `ensure(p + 1)`, so zeroing never erases
    written K/V.
    """

    def __init__(self, n_layers: int, rows: int, n_kv: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, rows, n_kv, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len, self.zeroed = max_len, 0

    def ensure(self, length: int) -> None:
        if length <= self.zeroed:
            return
        end = min(self.max_len, max(length, 2 * self.zeroed, 64))
        self.k[:, :, :, self.zeroed:end].zero_()
        self.v[:, :, :, self.zeroed:end].zero_()
        self.zeroed = end

    def clear(self, row: int) -> None:
        """Zero a row. A failed request may leave inf/NaN K/V behind; attention masks stale positions by
        adding -inf to their scores, which leaves NaN as NaN, so the row's next owner would inherit it."""
        self.k[:, row].zero_()
        self.v[:, row].zero_()

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of row src into row dst (all layers)."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]


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
    """Prefill and decode over an HF Llama-family model whose target projections are AdaptedLinear."""

    def __init__(self, hf: nn.Module, max_rows: int, max_len: int):
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
        self.cache = KVCache(len(self.layers), max_rows, self.n_kv, max_len, self.head_dim, self.dtype, self.device)
        self.max_rows, self.max_len = max_rows, max_len

    def qkv(self, a: nn.Module, x: torch.Tensor, cos, sin, batch) -> tuple[torch.Tensor, ...]:
        # x: [B, T, D] -> q: [B, H, T, hd], k, v: [B, KV, T, hd] (rotary applied to q, k)
        q, k, v = project((a.q_proj, a.k_proj, a.v_proj), x, batch)
        q, k, v = heads(q, self.n_heads, self.head_dim), heads(k, self.n_kv, self.head_dim), heads(v, self.n_kv, self.head_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def out(self, a: nn.Module, o: torch.Tensor, batch) -> torch.Tensor:
        # o: [B, H, T, hd] -> [B, T, D]
        B, _, T, _ = o.shape
        return project((a.o_proj,), o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), batch)[0]

    def prefill(self, tokens: torch.Tensor, last: torch.Tensor, row0: int, batch: AdapterBatch | None,
                keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens: [n, T] right-padded prompts for cache rows row0..row0+n-1; last: [n] index of each
        prompt's last token. Returns logits [n, V] (float32) at those positions. `keep`, when given, receives
        for every one of its keys (an index into the n prompts) the final normed hidden states [T, D] of that
        prompt (prompt logprobs: `logits_of` them in chunks, never a [T, V] tensor per prompt at once)."""
        n, T = tokens.shape
        self.cache.ensure(T)
        cos, sin = self.cos[:T], self.sin[:T]  # [T, hd]
        h = self.embed(tokens)  # [n, T, D]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self.qkv(a, layer.input_layernorm(h), cos, sin, batch)
            self.cache.k[i, row0:row0 + n, :, :T] = k
            self.cache.v[i, row0:row0 + n, :, :T] = v
            # right padding + causal mask: a real token never sees a pad token
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            h = h + self.out(a, o, batch)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h), batch)
        for j in keep or {}:
            keep[j] = self.norm(h[j, :int(last[j]) + 1])  # [T_j, D]
        h = h[torch.arange(n, device=h.device), last]  # [n, D]
        return self.lm_head(self.norm(h)).float()

    def logits_of(self, normed: torch.Tensor) -> torch.Tensor:
        """[T, D] normed hidden states -> [T, V] float32 logits."""
        return self.lm_head(normed).float()

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, length: int,
               batch: AdapterBatch | None) -> torch.Tensor:
        """tokens, pos: [B] the input token of cache rows 0..B-1 and its position; length = max(pos) + 1.
        Returns logits [B, V] (float32)."""
        B = tokens.shape[0]
        self.cache.ensure(length)
        rows = torch.arange(B, device=self.device)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, hd]
        # additive float mask, built once per step (a bool mask is converted by SDPA in every layer)
        visible = torch.arange(length, device=self.device)[None] <= pos[:, None]  # [B, L]
        mask = torch.zeros(B, 1, 1, length, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible[:, None, None], float("-inf"))  # [B, 1, 1, L]
        h = self.embed(tokens[:, None])  # [B, 1, D]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self.qkv(a, layer.input_layernorm(h), cos, sin, batch)
            kc, vc = self.cache.k[i], self.cache.v[i]  # [rows, KV, max_len, hd]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, kc[:B, :, :length], vc[:B, :, :length], attn_mask=mask,
                                               scale=self.scale, enable_gqa=True)
            h = h + self.out(a, o, batch)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h), batch)
        return self.lm_head(self.norm(h[:, 0])).float()


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
