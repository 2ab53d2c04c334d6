"""The model runner: one SchedulerOutput in, one SampledToken per sequence out.

It turns the scheduler's plain lists into tensors and an AdapterBatch, brings the cache (row moves) and
the weights (merge state) to what the step needs, runs the forward and samples. It owns the per-request
generators of seeded requests, created at prefill and dropped when the scheduler reports the request gone.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adapters.runtime import AdaptedModel
from server.grammar import accept
from server.model import DecoderModel
from server.residency import Residency
from server.sampler import Sampler
from server.scheduler import SchedulerOutput
from server.sequence import PromptLogprob, SampledToken


PROMPT_CHUNK = 256  # prompt positions turned into [chunk, V] logits at a time


def prompt_logprobs(logits_of, hidden: torch.Tensor, ids: list[int], k: int) -> list[PromptLogprob | None]:
    """Each prompt token's logprob under the model given the tokens before it (the first has none), with the
    top-k alternatives there. hidden: [T, D] normed states; computed in chunks of PROMPT_CHUNK positions."""
    out: list[PromptLogprob | None] = [None]
    target = torch.tensor(ids[1:], dtype=torch.long, device=hidden.device)
    for s in range(0, len(ids) - 1, PROMPT_CHUNK):
        lp = logits_of(hidden[s:s + PROMPT_CHUNK][: len(ids) - 1 - s]).log_softmax(-1)  # [c, V]
        chosen = lp.gather(1, target[s:s + lp.shape[0], None])[:, 0].tolist()
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        for c, (v, i) in enumerate(zip(top_v.tolist(), top_i.tolist())):
            out.append(PromptLogprob(ids[s + c + 1], chosen[c], list(zip(i, v))))
    return out


class ModelRunner:
    def __init__(self, adapted: AdaptedModel, residency: Residency, max_batch_size: int, max_model_len: int,
                 seed: int | None = None, eos_ids: tuple[int, ...] = ()):
        self.adapted, self.residency = adapted, residency
        self.model = DecoderModel(adapted.model, max_batch_size, max_model_len)
        self.device = self.model.device
        self.sampler = Sampler(seed, self.device, eos_ids)
        self.generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> list[SampledToken]:
        for request_id in out.finished_ids:
            self.generators.pop(request_id, None)
        for row in out.clear_rows:
            self.model.cache.clear(row)
        for src, dst, n in out.cache_moves:
            self.model.cache.move(src, dst, n)
        self.residency.apply_merge(out.merged)
        if out.empty:
            return []
        batch = self.adapted.batch(out.slots)
        keep = {j: None for j, s in enumerate(out.seqs) if out.prefill and s.params.prompt_logprobs is not None}
        logits = self._prefill(out, batch, keep) if out.prefill else self._decode(out, batch)
        params = [s.params for s in out.seqs]
        matchers = [s.matcher for s in out.seqs]
        constrained = any(m is not None for m in matchers)
        sampled = self.sampler.sample(logits, params, self._generators(out), [s.prompt_ids for s in out.seqs],
                                      [s.output_ids for s in out.seqs], matchers if constrained else None)
        if constrained:
            for j, ok in enumerate(accept(matchers, [s.token_id for s in sampled])):
                if not ok and sampled[j].error is None:
                    sampled[j] = SampledToken(0, error="the structured-output grammar refused the sampled token")
        for j, hidden in keep.items():
            seq = out.seqs[j]
            sampled[j] = replace(sampled[j], prompt=prompt_logprobs(self.model.logits_of, hidden, seq.prompt_ids,
                                                                     seq.params.prompt_logprobs))
        return sampled

    def _prefill(self, out: SchedulerOutput, batch, keep: dict) -> torch.Tensor:
        lens = [len(t) for t in out.token_ids]
        T = max(lens)
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in out.token_ids], dtype=torch.long, device=self.device)
        last = torch.tensor([n - 1 for n in lens], dtype=torch.long, device=self.device)
        return self.model.prefill(tokens, last, out.rows[0], batch, keep)

    def _decode(self, out: SchedulerOutput, batch) -> torch.Tensor:
        # rows are 0..B-1 in order (the scheduler keeps running rows dense)
        tokens = torch.tensor([t[0] for t in out.token_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor(out.positions, dtype=torch.long, device=self.device)
        return self.model.decode(tokens, pos, max(out.positions) + 1, batch)

    def _generators(self, out: SchedulerOutput) -> list[torch.Generator | None]:
        gens: list[torch.Generator | None] = []
        for s in out.seqs:
            if s.params.seed is None or s.params.temperature == 0:
                gens.append(None)
                continue
            if s.request_id not in self.generators:
                self.generators[s.request_id] = self.sampler.generator(s.params.seed)
            gens.append(self.generators[s.request_id])
        return gens
