"""Adapters prepared for a slot off the engine thread (AdaptedModel.prepare, Engine.resolve): an OSoRA image
loads as one copy of its slot-table row and serves exactly what a layer-by-layer load serves, in each dtype;
versions, deletion and the route's path keep their guarantees."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel, SlotImage
from server.api import generation

from .conftest import R_MAX, make_adapter
from .engine_helpers import GREEDY, make_engine, request, run_all, tokens

DTYPES = [torch.float32, torch.bfloat16]


def adapted_in(base, dtype: torch.dtype, n_slots: int = 5) -> AdaptedModel:
    return AdaptedModel(base, compute_factors(base.targets, R_MAX, progress=False), n_slots=n_slots, dtype=dtype)


def bank_state(adapted: AdaptedModel, slot: int) -> dict[str, torch.Tensor]:
    """Every per-slot tensor a layer's banks hold for `slot` (OSoRA's are views into the slot table)."""
    state = {"table": adapted.table[slot].clone()}
    for name, layer in adapted.layers.items():
        for method, bank in layer.banks.items():
            for attr, t in vars(bank).items():
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == adapted.n_slots:
                    state[f"{name}.{method}.{attr}"] = t[slot].clone()
    return state


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, layers", [(8, "all"), (R_MAX, "all"), (1, "all"), (8, "some")])
def test_image_load_equals_layer_by_layer_load(tiny_chat_base, dtype, rank, layers):
    adapted = adapted_in(tiny_chat_base, dtype)
    modules = None if layers == "all" else list(adapted.spec.shapes)[::3]
    a = make_adapter(adapted, "osora", seed=3, rank=rank)
    if modules is not None:
        a.layers = {m: a.layers[m] for m in modules}
    image = adapted.prepare(a)
    assert image.row is not None and image.row.dtype == dtype and image.adapter is a
    with torch.inference_mode():
        adapted.load(1, a)
        adapted.load(2, image)
        assert adapted.resident[2] is a
        ref, got = bank_state(adapted, 1), bank_state(adapted, 2)
        assert torch.equal(ref.pop("table"), got.pop("table"))
        assert_same_state(ref, got)
        x = torch.randn(2, 3, adapted.layers[next(iter(adapted.layers))].in_features, dtype=dtype)
        for layer in list(adapted.layers.values())[:3]:
            rows = [layer(x, adapted.batch([s, 0])) for s in (1, 2)]
            assert torch.equal(rows[0], rows[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_unload_and_slot_reuse_across_methods(tiny_chat_base, dtype):
    """An image unloads to an all-zero row; a LoRA adapter then loaded into its slot, and an image loaded where
    a LoRA adapter was, leave the same state as loading into a fresh slot."""
    adapted = adapted_in(tiny_chat_base, dtype)
    osora, lora = make_adapter(adapted, "osora", seed=1), make_adapter(adapted, "lora", seed=2)
    image = adapted.prepare(osora)
    assert adapted.prepare(lora).row is None  # other methods load layer by layer
    with torch.inference_mode():
        empty = bank_state(adapted, 1)
        adapted.load(1, image)
        adapted.unload(1)
        assert not adapted.table[1].any() and adapted.resident[1] is None
        adapted.load(1, lora)
        adapted.load(3, lora)
        assert_same_state(bank_state(adapted, 1), bank_state(adapted, 3))
        assert adapted.layers[next(iter(adapted.layers))].banks["lora"].slots.keys() == {1, 3}
        adapted.load(1, image)  # replaces the LoRA adapter
        adapted.load(4, osora)
        assert 1 not in adapted.layers[next(iter(adapted.layers))].banks["lora"].slots
        assert_same_state(bank_state(adapted, 1), bank_state(adapted, 4))
        adapted.unload(1), adapted.unload(3), adapted.unload(4)
        assert_same_state(bank_state(adapted, 1), empty)


def test_prepare_leaves_the_model_alone(tiny_chat_base):
    adapted = adapted_in(tiny_chat_base, torch.float32)
    before = adapted.table.clone()
    adapted.prepare(make_adapter(adapted, "osora", seed=5))
    assert torch.equal(adapted.table, before) and adapted.resident == [None] * adapted.n_slots


def test_resolved_requests_get_solo_tokens_in_a_mixed_batch(tiny, tmp_path):
    """Requests handed their prepared image (the route's path) get the tokens of the same requests loaded
    layer by layer on another engine, each alone."""
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    for i in range(3):
        store.put(f"a{i}", make_adapter(adapted, "osora", seed=10 + i).to_bytes())
    prompts = [[5, 6, 7], [9, 3], [4, 4, 8, 2]]
    try:
        solo = [tokens(run_all(eng, [request(i, prompts[i], f"a{i}")])[0]) for i in range(3)]
        assert eng.stats()["adapter_loads_total"] == 3
        eng.forget_adapter("a0"), eng.forget_adapter("a1"), eng.forget_adapter("a2")  # cold again

        async def resolved():
            runs = []
            for i in range(3):
                runs += await generation.start(eng, [prompts[i]], GREEDY, f"default/a{i}", 1, f"x{i}")
            return [await generation.collect(r) for r in runs]

        mixed = asyncio.run(resolved())
    finally:
        eng.shutdown()
    assert [r.token_ids for r in mixed] == solo
    assert eng.stats()["adapter_loads_total"] == 6


def test_resolve_follows_versions_and_deletion(tiny, tmp_path):
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    store.put("x", make_adapter(adapted, "osora", seed=1).to_bytes())
    s1, im1 = eng.resolve("x")
    assert isinstance(im1, SlotImage) and im1.adapter is s1.adapter and eng.resolve("x")[1] is im1  # kept
    store.put("x", make_adapter(adapted, "osora", seed=2).to_bytes())
    s2, im2 = eng.resolve("x")
    assert s2.version != s1.version and im2.adapter is s2.adapter and not torch.equal(im1.row, im2.row)
    eng.forget_adapter("x")
    assert eng.resolve("x")[1] is not im2  # a deleted adapter's images are dropped, not reused
    eng.shutdown()


def test_replaced_adapter_is_never_served_old_through_images(tiny, tmp_path):
    """A request resolved before a replacement keeps its version; one resolved after gets the new one."""
    adapted, _, tokenizer = tiny
    eng, store = make_engine(adapted, tokenizer, tmp_path / "store")
    v1, v2 = make_adapter(adapted, "osora", seed=1), make_adapter(adapted, "osora", seed=2)
    long = GREEDY.__class__(max_tokens=12, temperature=0, ignore_eos=True)
    try:
        store.put("x", v1.to_bytes())
        ref1 = tokens(run_all(eng, [request(0, [5, 6, 7], "x", long)])[0])
        store.put("x", v2.to_bytes())
        ref2 = tokens(run_all(eng, [request(1, [5, 6, 7], "x", long)])[0])
        store.put("x", v1.to_bytes())

        async def both():
            old = (await generation.start(eng, [[5, 6, 7]], long, "default/x", 1, "old"))[0]
            store.put("x", v2.to_bytes())
            new = (await generation.start(eng, [[5, 6, 7]], long, "default/x", 1, "new"))[0]
            return await asyncio.gather(generation.collect(old), generation.collect(new))

        old, new = asyncio.run(both())
    finally:
        eng.shutdown()
    assert ref1 != ref2 and old.token_ids == ref1 and new.token_ids == ref2
