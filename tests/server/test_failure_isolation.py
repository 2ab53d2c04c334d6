"""A request that fails inside the engine fails alone: a poisoned adapter (finite values that overflow to
inf/NaN in the forward pass) or one that cannot be loaded ends its own request with an error, and the other
rows of the same batch finish with their solo tokens."""

from __future__ import annotations

import torch

from server.engine import SamplingParams

from .conftest import make_adapter
from .engine_helpers import make_engine, request, run_all, tokens
from .test_engine import prompts

SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def poisoned(adapted):
    """A valid OSoRA file whose output scales are huge but finite: the forward overflows for its row."""
    adapter = make_adapter(adapted, "osora", seed=5)
    for params in adapter.layers.values():
        params["osora_O"] = torch.full_like(params["osora_O"], 3e38)
    return adapter


def test_a_poisoned_request_in_a_batch_of_8_fails_alone(tiny, tmp_path):
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    for i, method in enumerate(["osora", "loraxs", "vera", "lora"]):
        store.put(f"a{i}", make_adapter(adapted, method, seed=200 + i).to_bytes())
    store.put("poison", poisoned(adapted).to_bytes())
    names = ["a0", "a1", None, "poison", "a2", "a3", None, "a0"]
    ps = prompts(8, seed=3)
    reqs = [request(i, p, a, SAMPLED if i % 2 else GREEDY) for i, (p, a) in enumerate(zip(ps, names))]
    try:
        together = run_all(eng, reqs)
        alone = [run_all(eng, [r])[0] for i, r in enumerate(reqs) if names[i] != "poison"]
    finally:
        eng.shutdown()
    bad = together[3][-1]
    assert bad.finished and bad.finish_reason == "error" and "not finite" in bad.error
    healthy = [tokens(o) for i, o in enumerate(together) if names[i] != "poison"]
    assert healthy == [tokens(o) for o in alone]
    assert all(o[-1].finish_reason == "length" for i, o in enumerate(together) if names[i] != "poison")


def test_an_adapter_that_cannot_be_loaded_fails_its_request_only(tiny, tmp_path, monkeypatch):
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    store.put("good", make_adapter(adapted, "osora", seed=1).to_bytes())
    store.put("bad", make_adapter(adapted, "loraxs", seed=2).to_bytes())
    bad_version = store.get("bad").version
    real_load = adapted.load

    def load(slot, adapter):
        if adapter is store.get("bad").adapter:
            raise RuntimeError(f"injected load failure for {bad_version[:8]}")
        return real_load(slot, adapter)

    monkeypatch.setattr(adapted, "load", load)
    ps = prompts(3, seed=4)
    reqs = [request(0, ps[0], "good"), request(1, ps[1], "bad"), request(2, ps[2], None)]
    try:
        outs = run_all(eng, reqs)
        again = run_all(eng, [request(3, ps[0], "good")])[0]  # the slot it took was given back
    finally:
        eng.shutdown()
    assert outs[1][-1].finish_reason == "error" and "injected load failure" in outs[1][-1].error
    assert outs[0][-1].finish_reason == outs[2][-1].finish_reason == "length"
    assert tokens(again) == tokens(outs[0])


def test_scheduler_finishes_an_errored_row_alone_and_zeroes_its_blocks():
    """A failed row's K/V may be NaN: its blocks leave the prefix cache and are zeroed before their next owner
    (attention masks stale positions by adding -inf, which leaves NaN as NaN)."""
    from server.kv.blocks import BlockManager
    from server.sequence import SampledToken
    from tests.server.test_scheduler import sched, seq

    kv = BlockManager(16, 2)
    s = sched(max_batch_size=4, kv=kv)
    for i in range(3):
        s.add(seq(i, max_tokens=5))
    out = s.schedule()
    changed = s.update(out, [SampledToken(5), SampledToken(0, error="boom"), SampledToken(5)])
    failed = [q for q in changed if q.request_id == "r1"][0]
    assert failed.finish_reason == "error" and failed.error == "boom" and failed.output_ids == []
    r1_blocks = out.block_tables[1]
    assert not set(r1_blocks) & set(kv.hash_of)  # its full block was never registered, or is no longer
    assert out.block_tables[0][0] in kv.hash_of  # a healthy row's is (the rows share one prompt: r0 came first)
    nxt = s.schedule()
    assert sorted(nxt.zero_blocks) == sorted(r1_blocks) and [q.request_id for q in nxt.seqs] == ["r0", "r2"]
