"""The model runner: one SchedulerOutput in, one SampledToken per sequence out.

It turns the scheduler's plain lists into tensors and an AdapterBatch, brings the cache (row moves) and
the weights (merge state) to what the step needs, runs the forward and samples. It owns the per-request
generators of seeded requests, created at prefill and dropped when the scheduler reports the request gone.
"""

from __future__ import annotations

import torch

from adapters.runtime import AdaptedModel
from server.model import DecoderModel
from server.residency import Residency
from server.sampler import Sampler
from server.scheduler import SchedulerOutput
from server.sequence import SampledToken


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
        logits = self._prefill(out, batch) if out.prefill else self._decode(out, batch)
        params = [s.params for s in out.seqs]
        return self.sampler.sample(logits, params, self._generators(out), [s.prompt_ids for s in out.seqs],
                                   [s.output_ids for s in out.seqs])

    def _prefill(self, out: SchedulerOutput, batch) -> torch.Tensor:
        lens = [len(t) for t in out.token_ids]
        T = max(lens)
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in out.token_ids], dtype=torch.long, device=self.device)
        last = torch.tensor([n - 1 for n in lens], dtype=torch.long, device=self.device)
        return self.model.prefill(tokens, last, out.rows[0], batch)

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
