"""The engine over the paged KV cache on a tiny random model: prefix-cache hits, adapter-versioned blocks,
preemption under a tiny budget and chunked prefill must all give the tokens of the plain reference
(a full Hugging Face forward per token, W0 + ΔW for adapters)."""

from __future__ import annotations

import pytest
import torch

from server.engine import GenerationRequest, SamplingParams
from server.kv.budget import bytes_per_token

from .conftest import dense_reference, greedy_reference, make_adapter
from .engine_helpers import make_engine, request, run_all, tokens
from .test_engine import put_adapters

BS = 4  # small blocks: prompts of a few dozen tokens span many


def long_prompts(n: int, length: int, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = prefix or []
    return [head + torch.randint(3, 128, (length - len(head),), generator=g).tolist() for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def reference_for(eng, store, reference, adapted, adapter_id):
    return reference if adapter_id is None else dense_reference(reference, adapted, store.get(adapter_id).adapter)


@pytest.mark.parametrize("method", [None, "osora", "lora", "vera"])
def test_prefix_hits_give_the_uncached_tokens(tiny, tmp_path, method):
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=BS)
    aid = put_adapters(store, adapted, [method])[0]
    system = long_prompts(1, 24, seed=1)[0]  # a shared "system prompt" of 6 full blocks
    ps = [system + tail for tail in long_prompts(3, 5, seed=2)]
    try:
        outs = [run_all(eng, [request(i, p, aid, greedy(6))])[0] for i, p in enumerate(ps)]
        again = run_all(eng, [request(9, ps[0], aid, greedy(6))])[0]
    finally:
        eng.shutdown()
    model = reference_for(eng, store, reference, adapted, aid)
    for p, o in zip(ps, outs):
        assert tokens(o) == greedy_reference(model, p, 6)
    assert [o[-1].cached_tokens for o in outs] == [0, 24, 24]
    assert again[-1].cached_tokens == 28 and tokens(again) == tokens(outs[0])  # 7 full blocks of 29 tokens
    assert eng.stats()["prefix_cache_hit_tokens_total"] == 76


def test_replaced_or_deleted_adapter_never_hits_its_old_blocks(tiny, tmp_path):
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=BS)
    p = long_prompts(1, 21, seed=3)[0]
    v1, v2 = make_adapter(adapted, "osora", seed=1), make_adapter(adapted, "osora", seed=2)
    try:
        store.put("a", v1.to_bytes())
        first = run_all(eng, [request(0, p, "a", greedy(5))])[0]
        hit = run_all(eng, [request(1, p, "a", greedy(5))])[0]
        store.put("a", v2.to_bytes())  # replaced: a new version, a new namespace
        replaced = run_all(eng, [request(2, p, "a", greedy(5))])[0]
        store.delete("a")
        eng.forget_adapter("a")  # what DELETE /adapters/a does
        store.put("a", v2.to_bytes())  # the same bytes again: still computed afresh
        reuploaded = run_all(eng, [request(3, p, "a", greedy(5))])[0]
    finally:
        eng.shutdown()
    assert hit[-1].cached_tokens == 20 and tokens(hit) == tokens(first)
    assert replaced[-1].cached_tokens == 0 and reuploaded[-1].cached_tokens == 0
    assert tokens(replaced) == greedy_reference(dense_reference(reference, adapted, v2), p, 5) == tokens(reuploaded)
    assert tokens(replaced) != tokens(first)


def test_two_adapters_and_salts_never_share_blocks(tiny, tmp_path):
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=BS)
    ids = put_adapters(store, adapted, ["osora", "osora", None])
    p = long_prompts(1, 17, seed=4)[0]

    def run(i, aid, salt=None):
        req = GenerationRequest(request_id=f"s{i}", prompt_token_ids=p, params=greedy(4), adapter_id=aid,
                                cache_salt=salt)
        return run_all(eng, [req])[0]

    try:
        outs = [run(0, ids[0]), run(1, ids[1]), run(2, None), run(3, None, "tenant-x"), run(4, None, "tenant-x"),
                run(5, None), run(6, ids[0], "tenant-x")]
    finally:
        eng.shutdown()
    assert [o[-1].cached_tokens for o in outs] == [0, 0, 0, 0, 16, 16, 0]
    for o, aid in zip(outs, [ids[0], ids[1], None, None, None, None, ids[0]]):
        assert tokens(o) == greedy_reference(reference_for(eng, store, reference, adapted, aid), p, 4)


def tiny_budget(adapted, tokens_: int) -> str:
    cfg = adapted.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return str(tokens_ * bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, adapted.dtype))


def test_preemption_under_a_tiny_budget_completes_every_request_with_its_solo_tokens(tiny, tmp_path):
    adapted, reference, tokenizer = tiny
    # 64 tokens of KV (one max_model_len sequence) for 8 requests needing ~30 tokens each
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=BS,
                             kv_cache_memory=tiny_budget(adapted, 64))
    ids = put_adapters(store, adapted, ["osora", "lora", None, "loraxs", "sorsa", "vera", None, "osora"])
    ps = long_prompts(8, 10, seed=5)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, seed=11, ignore_eos=True)
    reqs = [request(i, p, a, seeded if i == 6 else greedy(20)) for i, (p, a) in enumerate(zip(ps, ids))]
    try:
        together = run_all(eng, reqs)
        preempted = eng.stats()["preemptions_total"]
        alone = tokens(run_all(eng, [request(20, ps[6], None, seeded)])[0])
    finally:
        eng.shutdown()
    assert preempted > 0 and eng.stats()["kv_blocks_total"] == 16
    assert all(o[-1].finish_reason == "length" for o in together)
    for i, (o, a) in enumerate(zip(together, ids)):
        if i == 6:
            assert tokens(o) == alone
        else:
            assert tokens(o) == greedy_reference(reference_for(eng, store, reference, adapted, a), ps[i], 20), i


def test_chunked_prefill_gives_the_one_shot_tokens_and_prompt_logprobs(tiny, tmp_path):
    adapted, reference, tokenizer = tiny
    ps = long_prompts(3, 37, seed=6)
    ids_methods = ["osora", None, "lora"]
    lp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=2, logprobs=1)

    def run(budget):
        eng, store = make_engine(adapted, tokenizer, tmp_path / f"store{budget}", kv_block_size=BS,
                                 max_num_batched_tokens=budget)
        ids = put_adapters(store, adapted, ids_methods)
        reqs = [request(i, p, a, lp if i == 1 else greedy(6)) for i, (p, a) in enumerate(zip(ps, ids))]
        try:
            return run_all(eng, reqs), eng.stats(), store, ids
        finally:
            eng.shutdown()

    chunked, stats, store, ids = run(8)  # 8 tokens a step for 3 prompts of 37: many chunks each
    one_shot, _, _, _ = run(4096)
    assert stats["prefill_steps"] >= 37 * 3 // 8
    for i, (c, o) in enumerate(zip(chunked, one_shot)):
        assert tokens(c) == tokens(o)
        assert tokens(c) == greedy_reference(reference_for(None, store, reference, adapted, ids[i]), ps[i], 6)
    pc, po = chunked[1][0].prompt_logprobs, one_shot[1][0].prompt_logprobs
    assert len(pc) == len(po) == 37 and pc[0] is None
    for a, b in zip(pc[1:], po[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("workspace_len", [512, 12])
def test_mixed_batch_with_chunks_equals_alone(tiny, tmp_path, workspace_len):
    """Every method in one running batch while long prompts are prefilled in chunks beside it; with a
    12-position decode workspace, rows with longer contexts gather their blocks in every step beside it."""
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", kv_block_size=BS, max_num_batched_tokens=12)
    eng.runner.model.workspace.MAX_LEN = workspace_len
    ids = put_adapters(store, adapted, ["osora", "loraxs", "sorsa", "vera", "lora", None, "osora", None])
    ps = long_prompts(4, 6, seed=7) + long_prompts(4, 30, seed=8)
    reqs = [request(i, p, a, greedy(10)) for i, (p, a) in enumerate(zip(ps, ids))]
    try:
        together = [tokens(o) for o in run_all(eng, reqs)]
        alone = [tokens(run_all(eng, [r])[0]) for r in reqs]
    finally:
        eng.shutdown()
    assert together == alone
    assert together == [greedy_reference(reference_for(eng, store, reference, adapted, a), p, 10)
                        for p, a in zip(ps, ids)]
