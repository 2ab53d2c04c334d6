"""The runner's two calls around sampling: mask the constrained rows' logits, then advance their matchers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_masks(logits: torch.Tensor, matchers: Sequence[object | None]) -> torch.Tensor:
    """logits: [B, V] -> a copy whose constrained rows allow only the tokens their grammar accepts next
    (unconstrained rows untouched; the input is not modified, so raw logprobs stay available)."""
    rows = [b for b, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    V = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(rows), V)  # [R, ceil(V/32)] int32
    for r, b in enumerate(rows):
        matchers[b].fill_next_token_bitmask(bitmask, r)
    sub = logits[rows].float()
    xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=V)
    out = logits.clone()
    out[rows] = sub.to(out.dtype)
    return out


def accept(matchers: Sequence[object | None], tokens: Sequence[int]) -> list[bool]:
    """Advance each constrained row's matcher by its sampled token; False where the grammar refused it."""
    return [m is None or m.is_terminated() or bool(m.accept_token(int(t))) for m, t in zip(matchers, tokens)]
