"""The engine end to end on a tiny random model: continuous batching with mixed adapters must not change
anyone's tokens, and the streamed outputs must follow the contract."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine import SamplingParams
from server.store import AdapterNotFound

from .conftest import dense_reference, greedy_reference, make_adapter
from .engine_helpers import GREEDY, make_engine, request, run_all, text, tokens

METHODS = ["osora", "loraxs", "sorsa", "vera", "lora", "osora", None, None]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture
def engine(tiny, tmp_path):
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    eng.start()
    yield eng, store, adapted, reference
    eng.shutdown()


def put_adapters(store, adapted, methods) -> list[str | None]:
    ids = []
    for i, method in enumerate(methods):
        if method is None:
            ids.append(None)
            continue
        store.put(f"a{i}", make_adapter(adapted, method, seed=100 + i).to_bytes())
        ids.append(f"a{i}")
    return ids


@pytest.mark.parametrize("policy", ["never", "auto", "always"])
def test_mixed_batch_equals_alone_and_dense_reference(tiny, tmp_path, policy):
    adapted, reference, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store", merge_policy=policy)
    ids = put_adapters(store, adapted, METHODS)
    ps = prompts(len(ids))
    reqs = [request(i, p, a, SamplingParams(max_tokens=40 if i % 2 else 6, temperature=0.0, ignore_eos=True))
            for i, (p, a) in enumerate(zip(ps, ids))]
    try:
        together = [tokens(o) for o in run_all(eng, reqs)]
        alone = [tokens(run_all(eng, [r])[0]) for r in reqs]
    finally:
        eng.shutdown()
    assert together == alone
    assert (eng.stats()["merges_total"] > 0) == (policy != "never")  # alone runs of 40 tokens merge
    for i, a in enumerate(ids):
        model = reference if a is None else dense_reference(reference, adapted, store.get(a).adapter)
        assert together[i] == greedy_reference(model, ps[i], reqs[i].params.max_tokens), f"request {i} ({a})"
    assert len({tuple(t) for t in together}) > 1


def test_stream_contract_and_stop_strings(engine):
    eng, store, adapted, _ = engine
    p = prompts(1, seed=3)[0]
    full = run_all(eng, [request(0, p, params=SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])[0]
    assert [o.finished for o in full] == [False] * (len(full) - 1) + [True]
    assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 30 == len(tokens(full))
    assert full[-1].prompt_tokens == len(p)
    whole = text(full)
    assert len(whole) >= 12, whole
    stop = whole[8:11]
    cut = whole[: whole.find(stop)]
    outs = run_all(eng, [request(1, p, params=SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                             stop=(stop, "\x00never")))])[0]
    assert outs[-1].finish_reason == "stop"
    assert text(outs) == cut
    assert all(stop not in o.text for o in outs)


def test_eos_stops_unless_ignored(engine):
    eng, _, _, _ = engine
    eos = eng.tokenizer.eos_token_id
    # find a prompt whose greedy continuation emits eos: force it by asking for the logits' argmax chain
    p = prompts(1, seed=5)[0]
    base = tokens(run_all(eng, [request(0, p, params=SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))])[0])
    outs = run_all(eng, [request(1, p, params=SamplingParams(max_tokens=20, temperature=0))])[0]
    if eos in base:
        assert tokens(outs) == base[: base.index(eos) + 1] and outs[-1].finish_reason == "stop"
    else:
        assert tokens(outs) == base and outs[-1].finish_reason == "length"
    assert eng.scheduler.eos_ids == {eos}


def test_seeded_sampling_ignores_batch_companions(engine):
    eng, _, _, _ = engine
    p = prompts(4, seed=7)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = tokens(run_all(eng, [request(0, p[0], params=seeded)])[0])
    other = SamplingParams(max_tokens=12, temperature=1.3)
    mixed = run_all(eng, [request(1, p[1], params=other), request(2, p[0], params=seeded),
                          request(3, p[2], params=other)])
    assert tokens(mixed[1]) == alone
    again = tokens(run_all(eng, [request(4, p[0], params=seeded)])[0])
    assert again == alone
    different = tokens(run_all(eng, [request(5, p[0], params=SamplingParams(**{**seeded.__dict__, "seed": 99}))])[0])
    assert different != alone


def test_logprobs(engine):
    eng, _, _, reference = engine
    p = prompts(1, seed=9)[0]
    outs = run_all(eng, [request(0, p, params=SamplingParams(max_tokens=3, temperature=0, logprobs=2,
                                                             ignore_eos=True))])[0]
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 3
    with torch.no_grad():
        ref = reference(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    first = tokens(outs)[0]
    assert lps[0].logprob == pytest.approx(float(ref[first]), abs=1e-4)
    assert len(lps[0].top) == 2 and max(lps[0].top.values()) == pytest.approx(float(ref.max()), abs=1e-4)
    assert lps[0].token == eng.tokenizer.decode([first])


def test_validation_errors_before_first_output(engine):
    eng, _, _, _ = engine

    async def first(req):
        agen = eng.generate(req)
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(first(request(0, [])))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(first(request(1, [5] * 60, params=SamplingParams(max_tokens=10))))
    with pytest.raises(AdapterNotFound):
        asyncio.run(first(request(2, [5, 6], adapter_id="nope")))
    assert eng.stats()["waiting"] == 0 and eng.stats()["running"] == 0


def test_consumer_exit_aborts_and_frees_the_row(engine):
    eng, _, _, _ = engine

    async def read_two():
        agen = eng.generate(request(0, [5, 6, 7], params=SamplingParams(max_tokens=50, temperature=0,
                                                                         ignore_eos=True)))
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return got

    got = asyncio.run(read_two())
    assert not got[-1].finished
    deadline = time.monotonic() + 10
    while eng.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    s = eng.stats()
    assert s["running"] == 0 and s["aborted_total"] == 1
    # the engine still serves after the abort
    assert len(tokens(run_all(eng, [request(1, [5, 6], params=GREEDY)])[0])) == 8


def test_abort_by_id_reports_abort(engine):
    eng, _, _, _ = engine

    async def main():
        agen = eng.generate(request(0, [5, 6, 7], params=SamplingParams(max_tokens=60, temperature=0,
                                                                         ignore_eos=True)))
        outs = [await agen.__anext__()]
        eng.abort("r0")
        outs += [o async for o in agen]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].completion_tokens < 60


def test_stats_count_work(engine):
    eng, store, adapted, _ = engine
    ids = put_adapters(store, adapted, ["osora", "lora"])
    run_all(eng, [request(i, [5, 6, 7], a) for i, a in enumerate(ids)])
    s = eng.stats()
    assert s["requests_total"] == 2 and s["tokens_generated_total"] == 16
    assert s["resident_adapters"] == 2 and s["running"] == 0 and s["step_count"] >= 8
