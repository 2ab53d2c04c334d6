"""Sampling: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from server.sampler import Sampler, apply_top_k, apply_top_p
from server.sequence import SamplingParams

V = 50


def logits(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(4)
    out = Sampler(0).sample(x, [SamplingParams(temperature=0)] * 4, [None] * 4)
    assert [o.token_id for o in out] == x.argmax(-1).tolist()


def test_top_k_and_top_p_masks():
    x = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    k = apply_top_k(x, [2, 0])
    assert torch.isinf(k[0]).tolist() == [True, False, False, True] and not torch.isinf(k[1]).any()
    p = apply_top_p(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])), [0.7, 0.85])
    assert torch.isinf(p[0]).tolist() == [False, False, True, True]
    assert torch.isinf(p[1]).tolist() == [False, False, False, True]  # 0.5 + 0.3 < 0.85: a third token
    assert not torch.isinf(apply_top_p(x[:1], [1.0])).any()


def test_sampling_follows_the_distribution():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(3000, 1)
    s = Sampler(0)
    ids = [o.token_id for o in s.sample(x, [SamplingParams(temperature=1.0)] * 3000, [None] * 3000)]
    freq = torch.bincount(torch.tensor(ids), minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)
    ids = [o.token_id for o in s.sample(x, [SamplingParams(temperature=1.0, top_k=1)] * 3000, [None] * 3000)]
    assert set(ids) == {0}


def test_seeded_row_ignores_companions_and_batch_position():
    s = Sampler(0)
    x = logits(1, seed=3)
    p = SamplingParams(temperature=1.5, seed=11)
    alone = [s.sample(x, [p], [s.generator(11)])[0].token_id for _ in range(1)]
    g = s.generator(11)
    seq_alone = [s.sample(x, [p], [g])[0].token_id for _ in range(20)]
    g = s.generator(11)
    mixed = []
    for i in range(20):
        batch = torch.cat([logits(i % 3 + 1, seed=i), x])
        n = batch.shape[0]
        out = s.sample(batch, [SamplingParams(temperature=1.0)] * (n - 1) + [p], [None] * (n - 1) + [g])
        mixed.append(out[-1].token_id)
    assert mixed == seq_alone and seq_alone[0] == alone[0]
    assert len(set(seq_alone)) > 1  # it really samples


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_chosen_and_top(k):
    x = logits(2, seed=4)
    out = Sampler(0).sample(x, [SamplingParams(temperature=0, logprobs=k), SamplingParams(temperature=0)],
                            [None, None])
    lp = x[0].log_softmax(-1)
    assert out[0].logprob == pytest.approx(float(lp.max()), abs=1e-5)
    assert [t for t, _ in out[0].top] == lp.topk(k).indices.tolist()
    assert out[1].logprob is None and out[1].top is None
