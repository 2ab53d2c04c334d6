"""Per-row logits processing before sampling, batched as tensors (no per-row Python loop over the vocabulary):
OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty`, vLLM's `repetition_penalty` and `min_tokens`.

Formulas (the plain-torch reference in tests/server/test_logits.py writes them out per token):
- frequency/presence (OpenAI): `l[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`, with c[j] the
  count of token j among the tokens generated so far;
- repetition (vLLM, as HF's CTRL penalty): for every token in the prompt or the output, `l[j] /= p` where
  `l[j] > 0`, else `l[j] *= p`;
- logit_bias: `l[j] += bias[j]`;
- min_tokens: while fewer tokens than that were generated, the end-of-sequence and `stop_token_ids` tokens get
  `-inf`.
Each row is processed as it would be alone, so a request keeps its solo tokens in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from server.sequence import SamplingParams


def needs_processing(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias
                or p.min_tokens)


def _padded(lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L] token ids (0-padded) and a [R, L] mask of the real entries."""
    width = max(1, max(len(x) for x in lists))
    ids = torch.zeros(len(lists), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(lists), width, dtype=torch.bool, device=device)
    for r, x in enumerate(lists):
        if x:
            ids[r, :len(x)] = torch.tensor(x, dtype=torch.long, device=device)
            mask[r, :len(x)] = True
    return ids, mask


def _counts(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    ids, mask = _padded(lists, device)
    counts = torch.zeros(len(lists), vocab, device=device)
    return counts.scatter_add_(1, ids, mask.float())  # [R, V]


def process(logits: torch.Tensor, params: Seq[SamplingParams], prompts: Seq[list[int]], outputs: Seq[list[int]],
            eos_ids: Seq[int]) -> torch.Tensor:
    """logits: [B, V] -> processed copy (rows that ask for nothing are unchanged)."""
    rows = [b for b, p in enumerate(params) if needs_processing(p)]
    if not rows:
        return logits
    x = logits[rows].float()  # [R, V]
    V, dev = x.shape[1], x.device
    ps = [params[b] for b in rows]
    col = lambda vals: torch.tensor(vals, dtype=x.dtype, device=dev)[:, None]  # noqa: E731  [R, 1]
    if any(p.repetition_penalty != 1.0 for p in ps):
        seen = _counts([prompts[b] + outputs[b] for b in rows], V, dev) > 0
        pen = col([p.repetition_penalty for p in ps]).expand_as(x)
        x = torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        c = _counts([outputs[b] for b in rows], V, dev)
        x = x - c * col([p.frequency_penalty for p in ps]) - (c > 0).to(x.dtype) * col([p.presence_penalty for p in ps])
    if any(p.logit_bias for p in ps):
        bias = torch.zeros_like(x)
        for r, p in enumerate(ps):  # one index_put per row with a bias (a handful of entries each)
            if p.logit_bias:
                tok, val = zip(*p.logit_bias)
                bias[r, list(tok)] = torch.tensor(val, dtype=x.dtype, device=dev)
        x = x + bias
    early = [r for r, b in enumerate(rows) if len(outputs[b]) < ps[r].min_tokens]
    if early:
        banned = [(r, t) for r in early for t in set(eos_ids) | set(ps[r].stop_token_ids) if 0 <= t < V]
        if banned:
            rr, tt = zip(*banned)
            x[list(rr), list(tt)] = float("-inf")
    out = logits.clone()
    out[rows] = x.to(out.dtype)
    return out
