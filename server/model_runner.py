"""The model runner: one SchedulerOutput in, one SampledToken (or None) per scheduled sequence out.

It turns the scheduler's plain lists into tensors and AdapterBatches, brings the cache (blocks to zero) and
the weights (merge state) to what the step needs, runs the forward and samples. A step's sequences split
into the decode group (one token each, sampled) and the prefill group (prompt chunks; sampled when the
chunk ends the prompt); a step with both runs them as one forward (`DecoderModel.mixed`: the adapter batch
has a row per token), a step with one group that group's forward. The runner owns the per-request
generators of seeded requests and the prompt logprobs of prompts being prefilled chunk by chunk, both
dropped when the scheduler reports the request gone.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adapters.runtime import AdaptedModel
from server.grammar import accept
from server.model import DecoderModel, padded_table
from server.residency import Residency
from server.sampler import Sampler
from server.scheduler import SchedulerOutput
from server.sequence import PromptLogprob, SampledToken

PROMPT_CHUNK = 256  # prompt positions turned into [chunk, V] logits at a time


def prompt_logprobs(logits_of, hidden: torch.Tensor, ids: list[int], start: int, k: int) -> list[PromptLogprob]:
    """Logprobs of prompt tokens ids[start+1 .. start+T] under the model given the tokens before each, with the
    top-k alternatives there; hidden: [T, D] normed states of positions start..start+T-1 (targets past the
    prompt's end are left out). Computed in chunks of PROMPT_CHUNK positions."""
    out: list[PromptLogprob] = []
    n = min(hidden.shape[0], len(ids) - 1 - start)
    target = torch.tensor(ids[start + 1:start + 1 + n], dtype=torch.long, device=hidden.device)
    for s in range(0, n, PROMPT_CHUNK):
        lp = logits_of(hidden[s:min(s + PROMPT_CHUNK, n)]).log_softmax(-1)  # [c, V]
        chosen = lp.gather(1, target[s:s + lp.shape[0], None])[:, 0].tolist()
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        for c, (v, i) in enumerate(zip(top_v.tolist(), top_i.tolist())):
            out.append(PromptLogprob(ids[start + s + c + 1], chosen[c], list(zip(i, v))))
    return out


class ModelRunner:
    def __init__(self, adapted: AdaptedModel, residency: Residency, num_blocks: int, block_size: int,
                 max_model_len: int, seed: int | None = None, eos_ids: tuple[int, ...] = ()):
        self.adapted, self.residency = adapted, residency
        self.model = DecoderModel(adapted.model, num_blocks, block_size, max_model_len)
        self.device = self.model.device
        self.sampler = Sampler(seed, self.device, eos_ids)
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_lps: dict[str, list[PromptLogprob | None]] = {}  # prompts being prefilled, by request

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> list[SampledToken | None]:
        for request_id in out.finished_ids:
            self.generators.pop(request_id, None)
            self.prompt_lps.pop(request_id, None)
        self.model.cache.zero(out.zero_blocks)
        self.residency.apply_merge(out.merged)
        if out.empty:
            return []
        decode = [j for j, ids in enumerate(out.token_ids) if len(ids) == 1 and out.sample[j]]
        chunks = [j for j in range(len(out.seqs)) if not (len(out.token_ids[j]) == 1 and out.sample[j])]
        logits: dict[int, torch.Tensor] = {}
        if decode and chunks:  # one forward: the chunks' tokens are rows beside the decode tokens
            logits.update(self._mixed(out, decode, chunks))
        elif decode:
            logits.update(zip(decode, self._decode(out, decode)))
        else:
            self.model.workspace.invalidate()
            logits.update(zip(chunks, self._prefill(out, chunks)))
        sampling = [j for j in range(len(out.seqs)) if out.sample[j]]
        results: list[SampledToken | None] = [None] * len(out.seqs)
        if sampling:
            for j, res in zip(sampling, self._sample(out, sampling, torch.stack([logits[j] for j in sampling]))):
                results[j] = res
        return results

    def _sample(self, out: SchedulerOutput, rows: list[int], logits: torch.Tensor) -> list[SampledToken]:
        seqs = [out.seqs[j] for j in rows]
        matchers = [s.matcher for s in seqs]
        constrained = any(m is not None for m in matchers)
        gens = [self._generator(s) for s in seqs]
        sampled = self.sampler.sample(logits, [s.params for s in seqs], gens, [s.prompt_ids for s in seqs],
                                      [s.output_ids for s in seqs], matchers if constrained else None)
        if constrained:
            for j, ok in enumerate(accept(matchers, [s.token_id for s in sampled])):
                if not ok and sampled[j].error is None:
                    sampled[j] = SampledToken(0, error="the structured-output grammar refused the sampled token")
        for j, s in enumerate(seqs):
            if s.request_id in self.prompt_lps and s.prompt_logprobs is None:
                sampled[j] = replace(sampled[j], prompt=self.prompt_lps.pop(s.request_id))
        return sampled

    def _prefill(self, out: SchedulerOutput, rows: list[int]) -> torch.Tensor:
        args, keep = self._chunk_inputs(out, rows)
        logits = self.model.prefill(*args, self.adapted.batch(self._token_slots(out, rows)), keep)
        self._keep_prompt_logprobs(out, rows, keep)
        return logits

    def _decode(self, out: SchedulerOutput, rows: list[int]) -> torch.Tensor:
        order, args = self._decode_inputs(out, rows)
        logits = self.model.decode(*args[:3], self.adapted.batch([out.slots[j] for j in order]), *args[3:])
        return _reorder(logits, order, rows)

    def _mixed(self, out: SchedulerOutput, decode: list[int], chunks: list[int]) -> dict[int, torch.Tensor]:
        order, dargs = self._decode_inputs(out, decode)
        cargs, keep = self._chunk_inputs(out, chunks)
        slots = [out.slots[j] for j in order] + self._token_slots(out, chunks)
        dl, cl = self.model.mixed(*dargs, *cargs, self.adapted.batch(slots), keep)
        self._keep_prompt_logprobs(out, chunks, keep)
        return {**dict(zip(decode, _reorder(dl, order, decode))), **dict(zip(chunks, cl))}

    @staticmethod
    def _token_slots(out: SchedulerOutput, rows: list[int]) -> list[int]:
        """The adapter slot of every chunk token (the chunks' tokens are rows of the forward)."""
        return [out.slots[j] for j in rows for _ in out.token_ids[j]]

    def _chunk_inputs(self, out: SchedulerOutput, rows: list[int]) -> tuple[tuple, dict[int, None]]:
        """The prefill group's (chunks, ctx, block tables) and the chunks whose hidden states are kept for
        prompt logprobs."""
        keep = {}
        for c, j in enumerate(rows):
            seq = out.seqs[j]
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None:
                keep[c] = None
                if out.positions[j] == 0:  # first chunk (or a recompute from scratch)
                    self.prompt_lps[seq.request_id] = [None]
        args = ([out.token_ids[j] for j in rows], [out.positions[j] for j in rows],
                [out.block_tables[j] for j in rows])
        return args, keep

    def _keep_prompt_logprobs(self, out: SchedulerOutput, rows: list[int], keep: dict[int, torch.Tensor]) -> None:
        for c, hidden in keep.items():
            seq = out.seqs[rows[c]]
            self.prompt_lps[seq.request_id] += prompt_logprobs(
                self.model.logits_of, hidden, seq.prompt_ids, out.positions[rows[c]], seq.params.prompt_logprobs)

    def _decode_inputs(self, out: SchedulerOutput, rows: list[int]) -> tuple[list[int], tuple]:
        """The decode group's row order and (tokens, pos, table, assigned, n_ws) for DecoderModel.decode: the
        rows go in the order of the model's decode workspace (sequences that decoded in the last step keep
        their rows, so their K/V are not gathered from the blocks again), long contexts after them."""
        limit = self.model.workspace.MAX_LEN
        short = [j for j in rows if out.positions[j] < limit]
        ws = self.model.workspace.assign([(out.seqs[j].request_id, out.seqs[j].arrival) for j in short])
        order = [short[i] for i in sorted(range(len(short)), key=ws.__getitem__)]
        order += [j for j in rows if out.positions[j] >= limit]
        tokens = torch.tensor([out.token_ids[j][0] for j in order], dtype=torch.long, device=self.device)
        pos = torch.tensor([out.positions[j] for j in order], dtype=torch.long, device=self.device)
        table = padded_table([out.block_tables[j] for j in order], self.device)
        return order, (tokens, pos, table, True, len(short))

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.temperature == 0:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = self.sampler.generator(seq.params.seed)
        return self.generators[seq.request_id]


def _reorder(logits: torch.Tensor, order: list[int], rows: list[int]) -> torch.Tensor:
    """Logits of the rows in `order` back to the order of `rows`."""
    where = {j: r for r, j in enumerate(order)}
    return logits[torch.tensor([where[j] for j in rows], device=logits.device)]
