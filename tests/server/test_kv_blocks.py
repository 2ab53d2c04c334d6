"""The block pool, the hash chain and the scheduler's use of them (preemption, chunks, prefix hits), with
hand-built model outputs: no model, no torch."""

from __future__ import annotations

import pytest

from server.kv.blocks import NULL_BLOCK, BlockManager
from server.kv.budget import num_blocks, parse_memory
from server.kv.hashing import chain, namespace
from server.sequence import SampledToken, Status

from .test_scheduler import sched, seq, step


def test_pool_hands_out_fresh_blocks_first_then_lru_and_never_the_null_block():
    kv = BlockManager(5, 2)
    a = kv.take([], 2)
    b = kv.take([], 2)
    assert a == [1, 2] and b == [3, 4] and NULL_BLOCK not in a + b and kv.take_to_zero() == [1, 2, 3, 4]
    assert not kv.can_take([], 1)
    kv.release(a)  # tail first: 2 is evicted before 1
    kv.release(b)
    assert list(kv.free) == [2, 1, 4, 3] and kv.num_used == 0
    assert kv.take([], 1) == [2] and kv.take_to_zero() == []  # reused blocks hold finite K/V: no zeroing


def test_hits_reference_registered_blocks_and_count_reclaimed_ones():
    kv = BlockManager(6, 2)
    ns = namespace(None)
    hashes = chain(ns, [1, 2, 3, 4, 5], 2, [])
    assert len(hashes) == 2
    blocks = kv.take([], 3)
    for blk, h in zip(blocks, hashes):
        kv.publish(blk, h, None)
    kv.release(blocks)
    assert kv.hits(hashes, limit=5) == blocks[:2] and kv.hits(hashes, limit=1) == blocks[:1]
    assert kv.can_take(blocks[:2], 3) and not kv.can_take(blocks[:2], 4)  # 5 free, 2 of them are the hits
    got = kv.take(blocks[:2], 1)
    assert got[:2] == blocks[:2] and kv.ref[blocks[0]] == 1 and blocks[0] not in kv.free
    other = chain(namespace(("t/a", "v1")), [1, 2, 3, 4, 5], 2, [])
    assert kv.hits(other, 5) == []  # another namespace: the same tokens are another chain


def test_namespaces_separate_adapter_versions_salts_and_the_base_model():
    roots = {namespace(None), namespace(None, "s1"), namespace(None, "s2"), namespace(("t/a", "v1")),
             namespace(("t/a", "v2")), namespace(("t/b", "v1")), namespace(("u/a", "v1")),
             namespace(("t/a", "v1"), "s1")}
    assert len(roots) == 8 and namespace(("t/a", "v1")) == namespace(("t/a", "v1"))


def test_drop_and_poisoned_release_unregister():
    kv = BlockManager(6, 1)
    blocks = kv.take([], 3)
    for i, blk in enumerate(blocks):
        kv.publish(blk, bytes([i]), "t/a" if i < 2 else None)
    assert kv.drop("t/a") == 2 and kv.cached_blocks == 1
    kv.take_to_zero()
    kv.release(blocks, poisoned=True)
    assert kv.cached_blocks == 0 and sorted(kv.take_to_zero()) == blocks


@pytest.mark.parametrize("spec, expected", [("0.25", 0.25), ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6),
                                            ("1000", 1000), ("1.5k", 1500)])
def test_parse_memory(spec, expected):
    assert parse_memory(spec) == expected


@pytest.mark.parametrize("spec", ["", "abc", "-1", "0", "4 parsecs"])
def test_parse_memory_refuses(spec):
    with pytest.raises(ValueError):
        parse_memory(spec)


def test_num_blocks_is_the_budget_not_batch_times_length():
    kw = dict(per_token=1000, block_size=16, max_batch_size=64, max_model_len=32768, device=None)
    assert num_blocks("64MiB", **kw) == 64 * 2**20 // 16000 + 1
    assert num_blocks("1TiB", **kw) == 64 * 2048 + 1  # never more than the batch can use
    with pytest.raises(ValueError, match="--max-model-len 32768"):
        num_blocks("1MB", **kw)


# ---- the scheduler with blocks ------------------------------------------------------------------

def test_preemption_takes_the_youngest_and_recomputes_its_tokens():
    kv = BlockManager(5, 2, caching=False)  # 4 usable blocks = 8 tokens (r0 and r1 are the same tokens)
    s = sched(kv=kv, max_model_len=8)
    s.add(seq(0, n_prompt=3, max_tokens=5))
    s.add(seq(1, n_prompt=3, max_tokens=5))
    step(s, {})  # both prefill: 2 blocks each
    out, _ = step(s, {})  # decode at position 3: still in the second block
    assert not out.preempted and kv.num_free == 0
    out, _ = step(s, {})  # position 4 needs a third block each: r1 (the youngest) gives its blocks back
    assert [q.request_id for q in out.preempted] == ["r1"] and [q.request_id for q in out.seqs] == ["r0"]
    r1 = out.preempted[0]
    assert r1.status is Status.WAITING and r1.blocks == [] and r1.num_computed == 0 and r1.output_ids == [5, 5]
    while s.running:
        out, _ = step(s, {})
    out, _ = step(s, {})  # r0 finished: r1 comes back, recomputing prompt + output but the last token
    assert [q.request_id for q in out.seqs] == ["r1"] and out.token_ids == [[2, 3, 4, 5, 5]]
    assert out.positions == [0] and out.sample == [True]
    while s.has_work:
        _, changed = step(s, {})
    assert r1.finish_reason == "length" and r1.output_ids == [5] * 5 and s.preemptions >= 1


def test_chunked_prefill_runs_beside_decodes_and_samples_at_the_last_chunk():
    s = sched(max_batch_size=2, max_num_batched_tokens=4, kv=BlockManager(32, 4))
    s.add(seq(0, n_prompt=2, max_tokens=9))
    step(s, {})
    s.add(seq(1, n_prompt=10, max_tokens=2))
    seen = []
    for _ in range(4):
        out, _ = step(s, {})
        seen.append([(q.request_id, len(t), smp) for q, t, smp in zip(out.seqs, out.token_ids, out.sample)])
    # r0 decodes every step; r1's prompt goes in chunks of the 3 tokens left, then samples with its last chunk
    assert seen == [[("r0", 1, True), ("r1", 3, False)], [("r0", 1, True), ("r1", 3, False)],
                    [("r0", 1, True), ("r1", 3, False)], [("r0", 1, True), ("r1", 1, True)]]
    r1 = s.running[1]
    assert r1.num_computed == 10 and r1.output_ids == [5]


def test_prefix_hits_skip_cached_blocks_but_never_the_last_token():
    kv = BlockManager(32, 4)
    s = sched(kv=kv)
    s.add(a := seq(0, n_prompt=8, max_tokens=1))
    step(s, {})
    assert a.cached_tokens == 0 and kv.cached_blocks == 2  # both full prompt blocks registered
    s.add(b := seq(1, n_prompt=8, max_tokens=1))  # the same 8 tokens: 1 block reused, the last recomputed
    out, _ = step(s, {})
    assert out.positions == [4] and out.token_ids == [[6, 7, 8, 9]] and b.cached_tokens == 4
    s.add(c := seq(2, n_prompt=11, max_tokens=1))  # 2 full blocks cached, 3 tokens to compute
    out, _ = step(s, {})
    assert out.positions == [8] and c.cached_tokens == 8 and kv.hit_tokens == 12 and kv.query_tokens == 27


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    kv = BlockManager(32, 4)
    s = sched(kv=kv)
    s.add(seq(0, n_prompt=8, max_tokens=1))
    step(s, {})
    s.add(q := seq(1, n_prompt=8, max_tokens=1, prompt_logprobs=0))
    out, _ = step(s, {})
    assert out.positions == [0] and q.cached_tokens == 0


def test_a_pool_too_small_for_two_prompts_at_once_finishes_both():
    kv = BlockManager(7, 2)  # 6 usable blocks = 12 tokens; two 9-token prompts + 3 tokens each need 12 blocks
    s = sched(max_batch_size=2, max_num_batched_tokens=4, max_model_len=12, kv=kv)
    s.add(seq(0, n_prompt=9, max_tokens=3))
    s.add(seq(1, n_prompt=9, max_tokens=3))
    done = []
    for _ in range(50):
        _, changed = step(s, {})
        done += [q for q in changed if q.status is Status.FINISHED]
        if not s.has_work:
            break
    assert sorted(q.request_id for q in done) == ["r0", "r1"] and s.preemptions >= 1
    assert all(q.output_ids == [5, 5, 5] and q.finish_reason == "length" for q in done)
    assert kv.num_used == 0


def test_results_of_chunk_rows_are_none_and_errors_end_the_row():
    s = sched(max_num_batched_tokens=4, kv=BlockManager(32, 4))
    s.add(q := seq(0, n_prompt=6, max_tokens=3))
    out = s.schedule()
    assert out.sample == [False]
    s.update(out, [None])
    assert q.num_computed == 4 and q.output_ids == []
    out = s.schedule()
    changed = s.update(out, [SampledToken(0, error="bad")])
    assert changed == [q] and q.finish_reason == "error" and not s.running
