"""Sampling the next token of every row: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws from p. The noise q of a seeded
request comes from its own torch.Generator, one row at a time, so its tokens do not depend on which other
requests share the batch; unseeded rows draw their noise together from the runner's generator.

Logprobs are those of the model's distribution (log_softmax of the raw logits, before temperature, top-k
and top-p), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from server.grammar import apply_masks
from server.logits import process
from server.sequence import SampledToken, SamplingParams


def apply_top_k(x: torch.Tensor, k: list[int]) -> torch.Tensor:
    """x: [B, V] logits; keep each row's k[b] largest (k <= 0: keep all)."""
    kk = torch.tensor([v if v > 0 else x.shape[1] for v in k], device=x.device).clamp(max=x.shape[1])
    kth = x.topk(int(kk.max()), dim=-1).values.gather(1, (kk - 1)[:, None])  # [B, 1]
    return x.masked_fill(x < kth, float("-inf"))


def apply_top_p(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """x: [B, V] logits; keep the smallest set of top tokens whose probability reaches p[b]."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    pp = torch.tensor(p, dtype=probs.dtype, device=x.device)[:, None]
    drop = before >= pp  # the first token is always kept (before = 0)
    return x.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def race_noise(shape: tuple[int, int], gens: list[torch.Generator | None], default: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, V]; rows with a generator draw from it alone."""
    q = torch.empty(shape, device=device).exponential_(generator=default)
    for b, g in enumerate(gens):
        if g is not None:
            q[b].exponential_(generator=g)
    return q


class Sampler:
    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu", eos_ids: Seq[int] = ()):
        self.device = torch.device(device)
        self.eos_ids = tuple(eos_ids)  # banned by min_tokens
        self.default = torch.Generator(device=self.device)
        if seed is None:
            self.default.seed()
        else:
            self.default.manual_seed(seed)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
               prompts: Seq[list[int]] | None = None, outputs: Seq[list[int]] | None = None,
               matchers: Seq[object | None] | None = None) -> list[SampledToken]:
        """logits: [B, V] float32 -> one SampledToken per row. `prompts`/`outputs` (each row's token ids) feed
        the penalties, logit_bias and min_tokens (server.logits); logprobs stay those of the raw model. A row
        whose logits are not all finite (an adapter that overflows) gets an error instead of a token: it fails
        alone, the others are untouched. `matchers` (structured output) mask their rows last, so the
        constraint holds whatever the penalties did."""
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()
        if bad:
            logits = logits.clone()
            logits[bad] = 0.0  # sample the healthy rows exactly as if the bad ones were not there
        x = logits if prompts is None else process(logits, params, prompts, outputs or [[]] * len(params),
                                                     self.eos_ids)
        if matchers is not None:
            x = apply_masks(x, matchers)
        tokens = x.argmax(-1)  # [B]
        hot = [b for b, p in enumerate(params) if p.temperature > 0]
        if hot:
            tokens[hot] = self._draw(x[hot], [params[b] for b in hot], [gens[b] for b in hot])
        out = self._outputs(logits, tokens, params)
        for b in bad:
            out[b] = SampledToken(0, error="the model's output for this request was not finite (NaN or inf); "
                                           "its adapter's values are likely too large")
        return out

    def _draw(self, x: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> torch.Tensor:
        # x: [H, V] logits of the rows that sample
        x = x / torch.tensor([p.temperature for p in params], device=x.device)[:, None]
        if any(p.top_k > 0 for p in params):
            x = apply_top_k(x, [p.top_k for p in params])
        if any(p.top_p < 1.0 for p in params):
            x = apply_top_p(x, [p.top_p for p in params])
        probs = x.softmax(-1)
        return (probs / race_noise(tuple(x.shape), gens, self.default, x.device)).argmax(-1)

    def _outputs(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[SampledToken]:
        ids = tokens.tolist()
        want = [b for b, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return [SampledToken(t) for t in ids]
        lp = logits[want].float().log_softmax(-1)  # [W, V]
        chosen = lp.gather(1, tokens[want][:, None])[:, 0].tolist()
        k = max(params[b].logprobs for b in want)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        out = [SampledToken(t) for t in ids]
        for j, b in enumerate(want):
            n = params[b].logprobs
            out[b] = SampledToken(ids[b], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return out
