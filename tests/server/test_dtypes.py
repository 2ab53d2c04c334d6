"""What holds in bfloat16 (docs/engine.md): a request's greedy tokens in a mixed batch, from the prefix cache or
after chunked prefill equal its tokens alone up to the first near-tie — a step where the two best candidates
alone are within NEAR_TIE nats, where a different batch's rounding may pick the other one. In float32 the
tokens are equal outright (tests/server/test_engine.py, test_paged_engine.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel
from server.engine import SamplingParams

from .conftest import R_MAX, greedy_reference
from .engine_helpers import make_engine, request, run_all, tokens
from .test_engine import METHODS, prompts, put_adapters

NEAR_TIE = 0.02  # nats: a few bf16 steps of a logit (the tiny model's median top-2 gap is ~0.03)
LOGPROBS = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=2)


def gaps(outs) -> list[float]:
    """Per generated token: the alone run's logprob gap between its best and second-best candidate."""
    out = []
    for lp in (lp for o in outs for lp in o.logprobs):
        best = sorted(lp.top.values(), reverse=True)
        out.append(best[0] - best[1] if len(best) > 1 else float("inf"))
    return out


def assert_equal_to_near_tie(got: list[int], alone: list[int], alone_gaps: list[float], what: str) -> None:
    k = next((i for i, (a, b) in enumerate(zip(got, alone)) if a != b), None)
    assert len(got) == len(alone), what
    if k is not None:
        assert alone_gaps[k] < NEAR_TIE, f"{what}: differs at token {k} where alone had a gap of {alone_gaps[k]:.4f}"


@pytest.fixture
def bf16(tiny_chat_base):
    reference = copy.deepcopy(tiny_chat_base.model).eval().to(torch.bfloat16)
    factors = compute_factors(tiny_chat_base.targets, R_MAX, progress=False)
    return AdaptedModel(tiny_chat_base, factors, n_slots=8, dtype=torch.bfloat16), reference, tiny_chat_base.tokenizer


def test_bf16_mixed_batch_chunks_and_prefix_hits_equal_alone_up_to_a_near_tie(bf16, tmp_path):
    adapted, reference, tokenizer = bf16
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=4, max_num_batched_tokens=12)
    ids = put_adapters(store, adapted, METHODS)
    ps = prompts(len(ids), seed=1)
    ps = [p * 3 for p in ps]  # long enough for chunks and full blocks
    reqs = [request(i, p, a, LOGPROBS) for i, (p, a) in enumerate(zip(ps, ids))]
    try:
        together = run_all(eng, reqs)  # chunked prefill beside decodes, every method in one batch
        alone = [run_all(eng, [r])[0] for r in reqs]  # prefix hits: the same prompts again, alone
    finally:
        eng.shutdown()
    assert sum(o[-1].cached_tokens for o in alone) > 0
    for i, (t, a) in enumerate(zip(together, alone)):
        assert_equal_to_near_tie(tokens(t), tokens(a), gaps(a), f"request {i} ({ids[i]})")
        if ids[i] is None:  # base rows: the Hugging Face model in bfloat16
            assert_equal_to_near_tie(greedy_reference(reference, ps[i], 30), tokens(a), gaps(a), f"base row {i}")
