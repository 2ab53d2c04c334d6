"""Penalties, logit_bias and min_tokens, batched, against a plain-torch reference that applies each formula
token by token (OpenAI's for presence/frequency, HF/vLLM's for repetition)."""

from __future__ import annotations

import pytest
import torch

from server.logits import process
from server.sampler import Sampler
from server.sequence import SamplingParams

V, EOS = 50, 1


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    x = logits.clone().float()
    if p.repetition_penalty != 1.0:
        for j in set(prompt + output):
            x[j] = x[j] / p.repetition_penalty if x[j] > 0 else x[j] * p.repetition_penalty
    for j in set(output):
        x[j] -= output.count(j) * p.frequency_penalty + p.presence_penalty
    for j, b in p.logit_bias:
        x[j] += b
    if len(output) < p.min_tokens:
        for j in {EOS, *p.stop_token_ids}:
            x[j] = float("-inf")
    return x


CASES = [
    SamplingParams(),
    SamplingParams(presence_penalty=0.7),
    SamplingParams(frequency_penalty=1.3),
    SamplingParams(presence_penalty=-0.5, frequency_penalty=0.4),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=2.0),
    SamplingParams(logit_bias=((3, 100.0), (7, -100.0), (49, 2.5))),
    SamplingParams(min_tokens=5, stop_token_ids=(4, 9)),
    SamplingParams(min_tokens=2, presence_penalty=2.0, logit_bias=((EOS, 5.0),)),
]


def rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 3
    prompts = [torch.randint(0, V, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    outputs = [torch.randint(0, V, (i % 6,), generator=g).tolist() for i in range(n)]
    return logits, prompts, outputs


def test_batched_processing_equals_the_per_token_reference():
    logits, prompts, outputs = rows(len(CASES))
    got = process(logits, CASES, prompts, outputs, [EOS])
    for b, p in enumerate(CASES):
        torch.testing.assert_close(got[b], reference(logits[b], p, prompts[b], outputs[b]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("p", CASES)
def test_a_row_is_processed_as_it_would_be_alone(p):
    logits, prompts, outputs = rows(len(CASES), seed=1)
    params = [CASES[(i * 3) % len(CASES)] for i in range(len(CASES))]
    params[4] = p
    batched = process(logits, params, prompts, outputs, [EOS])[4]
    alone = process(logits[4:5], [p], prompts[4:5], outputs[4:5], [EOS])[0]
    assert torch.equal(batched, alone)


def test_greedy_sampling_follows_the_processed_logits_but_logprobs_stay_raw():
    logits, prompts, outputs = rows(1, seed=2)
    top = int(logits[0].argmax())
    p = SamplingParams(temperature=0, logit_bias=((top, -100.0),), logprobs=1)
    out = Sampler(0, eos_ids=[EOS]).sample(logits, [p], [None], prompts, outputs)[0]
    assert out.token_id != top and out.token_id == int(reference(logits[0], p, prompts[0], outputs[0]).argmax())
    assert out.logprob == pytest.approx(float(logits[0].log_softmax(-1)[out.token_id]), abs=1e-5)
