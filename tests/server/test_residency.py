"""Adapter slots on a tiny model: LRU eviction, pinning, version replacement, merge policies."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.residency import AUTO_MERGE_MIN_TOKENS, AUTO_MERGE_STABLE_STEPS, Residency
from server.scheduler import Scheduler
from server.sequence import Detokenizer, SampledToken, SamplingParams, Sequence

from .conftest import adapted_pair, make_adapter
from .engine_helpers import collect, make_engine, request, run_all, tokens


@pytest.fixture
def small(tiny_chat_base):
    """An AdaptedModel with 2 slots (+ slot 0) and three adapters."""
    adapted, _ = adapted_pair(tiny_chat_base, n_slots=3)
    adapters = {n: make_adapter(adapted, "osora", seed=i) for i, n in enumerate("abc")}
    return adapted, adapters


def key(name: str, version: str = "v1") -> tuple[str, str]:
    return (name, version)


def test_lru_eviction_of_unpinned_slots(small):
    adapted, ad = small
    r = Residency(adapted, "never")
    sa, sb = r.acquire(key("a"), ad["a"]), r.acquire(key("b"), ad["b"])
    assert {sa, sb} == {1, 2} and adapted.resident[sa] is ad["a"]
    assert r.acquire(key("c"), ad["c"]) is None  # both pinned: wait
    r.release(key("a"))
    r.release(key("b"))
    assert r.acquire(key("a"), ad["a"]) == sa and r.loads == 2  # still resident: no reload
    r.release(key("a"))  # now b is the least recently used
    assert r.acquire(key("c"), ad["c"]) == sb and adapted.resident[sb] is ad["c"]
    assert r.evictions == 1 and set(r.resident()) == {key("a"), key("c")}


def test_versions_get_their_own_slots_and_forget(small):
    adapted, ad = small
    r = Residency(adapted, "never")
    old = r.acquire(key("a", "v1"), ad["a"])
    new = r.acquire(key("a", "v2"), ad["b"])
    assert old != new and adapted.resident[old] is ad["a"] and adapted.resident[new] is ad["b"]
    r.release(key("a", "v2"))
    r.forget("a")  # v2 is idle: dropped now; v1 is pinned: dropped on release
    assert r.resident() == [key("a", "v1")]
    r.release(key("a", "v1"))
    assert r.resident() == [] and sorted(r.free) == [1, 2]


def test_request_waits_when_every_slot_is_pinned(small):
    adapted, ad = small
    r = Residency(adapted, "never")
    s = Scheduler(max_batch_size=8, max_model_len=32, max_queue=8, eos_ids={1}, slots=r)
    for i, name in enumerate("abc"):
        s.add(Sequence(f"r{i}", [5, 6], SamplingParams(max_tokens=2), Detokenizer(str, [5]),
                       adapter_key=key(name), adapter=ad[name]))
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["r0", "r1"] and len(s.waiting) == 1
    for _ in range(2):
        s.update(out, [SampledToken(5)] * len(out.seqs))
        out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["r2"] and out.prefill  # a slot was freed: it starts


def seqs_for(keys, remaining=AUTO_MERGE_MIN_TOKENS):
    return [Sequence(f"r{i}", [5], SamplingParams(max_tokens=remaining), Detokenizer(str, [5]), adapter_key=k)
            for i, k in enumerate(keys)]


@pytest.mark.parametrize("policy, keys, remaining, merged", [
    ("never", [key("a")] * 3, 100, None),
    ("auto", [key("a")] * 3, 100, key("a")),
    ("auto", [key("a")], AUTO_MERGE_MIN_TOKENS - 1, None),  # too short to pay for a merge
    ("auto", [key("a"), key("b")], 100, None),
    ("auto", [key("a"), None], 100, None),
    ("always", [key("a")], 1, key("a")),
    ("always", [None, None], 100, None),
])
def test_merge_target(small, policy, keys, remaining, merged):
    r = Residency(small[0], policy)
    running = seqs_for(keys, remaining)
    if policy == "auto":  # auto waits until one adapter has held the batch for a few steps
        for _ in range(AUTO_MERGE_STABLE_STEPS - 1):
            assert r.merge_target(running) is None
    assert r.merge_target(running) == merged


def test_auto_does_not_merge_on_a_blip(small):
    """One adapter alone for fewer than AUTO_MERGE_STABLE_STEPS steps (a request admitted just before the
    rest of its burst) is not merged; the count starts again whenever the batch changes hands."""
    r = Residency(small[0], "auto")
    alone, mixed, other = seqs_for([key("a")], 100), seqs_for([key("a"), key("b")], 100), seqs_for([key("b")], 100)
    for _ in range(AUTO_MERGE_STABLE_STEPS - 1):
        assert r.merge_target(alone) is None
    assert r.merge_target(mixed) is None
    for _ in range(AUTO_MERGE_STABLE_STEPS - 1):
        assert r.merge_target(other) is None
    assert r.merge_target(alone) is None  # a, but after b: counting again
    for _ in range(AUTO_MERGE_STABLE_STEPS - 2):
        assert r.merge_target(alone) is None
    assert r.merge_target(alone) == key("a")


def test_always_admits_only_the_running_adapter(small):
    r = Residency(small[0], "always")
    assert r.admits(key("a"), []) and r.admits(key("a"), [key("a")])
    assert not r.admits(key("b"), [key("a")]) and not r.admits(None, [key("a")])
    assert Residency(small[0], "auto").admits(key("b"), [key("a")])


def test_merge_then_unmerge_is_bit_exact_and_merged_logits_match(small):
    adapted, ad = small
    r = Residency(adapted, "auto")
    slot = r.acquire(key("a"), ad["a"])
    pristine = {n: l.weight.clone() for n, l in adapted.layers.items()}
    x = torch.randint(3, 100, (1, 6))
    with torch.no_grad(), adapted.use(adapted.batch([slot])):
        unmerged = adapted.model(x).logits
    r.apply_merge(key("a"))
    with torch.no_grad(), adapted.use(adapted.batch([slot])):
        merged = adapted.model(x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    r.apply_merge(None)
    assert all(torch.equal(l.weight, pristine[n]) for n, l in adapted.layers.items())


def test_evicting_the_merged_adapter_unmerges(small):
    adapted, ad = small
    r = Residency(adapted, "auto")
    r.acquire(key("a"), ad["a"])
    r.apply_merge(key("a"))
    r.release(key("a"))
    r.acquire(key("b"), ad["b"])
    r.acquire(key("c"), ad["c"])  # evicts a
    assert r.merged is None and adapted.merged is None


def test_in_flight_request_keeps_its_version(tiny, tmp_path):
    """Replacing an adapter while a request runs: it finishes on the old version, a new request gets the new."""
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    v1 = make_adapter(adapted, "osora", seed=1).to_bytes()
    v2 = make_adapter(adapted, "loraxs", seed=2).to_bytes()
    long = request(0, [5, 6, 7], "x", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    try:
        store.put("x", v1)
        ref_v1 = tokens(run_all(eng, [long])[0])

        async def replace_midway():
            agen = eng.generate(long)
            outs = [await agen.__anext__()]
            store.put("x", v2)
            second = asyncio.ensure_future(collect(eng, request(1, [5, 6, 7], "x")))
            outs += [o async for o in agen]
            return outs, await second

        store.put("x", v1)
        old, new = asyncio.run(replace_midway())
        ref_v2 = tokens(run_all(eng, [request(2, [5, 6, 7], "x")])[0])
    finally:
        eng.shutdown()
    assert tokens(old) == ref_v1 and tokens(new) == ref_v2 and ref_v1[:8] != ref_v2
    assert eng.stats()["resident_adapters"] == 2
