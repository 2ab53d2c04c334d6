"""The fused serving path (adapters/fused.py) against the per-layer dense references: every method, mixed
ranks and methods in one batch, biases, merge through the fused weights, and the per-batch table gather."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from adapters.base_model import from_module
from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter

from .conftest import R_MAX
from .test_methods import TEST_CASES, dense_reference, load_all


def check_groups(adapted: AdaptedModel, slots: list[int], atol: float = 1e-4) -> None:
    """Every fused group's output, member by member and row by row, equals W0 x + ΔW x."""
    batch = adapted.batch(slots)
    names = {id(layer): name for name, layer in adapted.layers.items()}
    g = torch.Generator().manual_seed(3)
    for group in adapted.fused:
        for lead in ((3,), (1,), ()):  # prefill [B, T, k], decode [B, 1, k], and plain rows [B, k]
            x = torch.randn(len(slots), *lead, group.k, generator=g)
            with torch.inference_mode():
                y = group(x, batch)
            assert y.shape == (len(slots), *lead, group.D)
            for m, part in zip(group.members, y.split(group.sizes, dim=-1)):
                bias = 0 if m.bias is None else m.bias
                for row, slot in enumerate(slots):
                    ref = dense_reference(adapted, names[id(m)], slot, x[row]) + bias
                    torch.testing.assert_close(part[row], ref, atol=atol, rtol=0)


def test_groups_share_inputs_and_weights(tiny_adapted):
    by_size = sorted(len(g.members) for g in tiny_adapted.fused)
    assert by_size == [1, 1, 1, 1, 2, 2, 3, 3]  # per decoder layer: q/k/v, gate/up, o, down
    for g in tiny_adapted.fused:
        for m in g.members:  # the member's weight is a view into the fused matrix, not a copy
            assert m.weight.untyped_storage().data_ptr() == g.weight.untyped_storage().data_ptr()
            assert m.fused is g


@pytest.mark.parametrize("method,ranks", TEST_CASES)
def test_fused_matches_dense_reference(tiny_adapted, tiny_factors, method, ranks):
    adapters = [random_adapter(method, tiny_adapted.spec, tiny_factors, r, seed=i, vera_seed=i % 2)
                for i, r in enumerate(ranks)]
    load_all(tiny_adapted, tiny_factors, adapters)
    check_groups(tiny_adapted, [0, 1, 2, 3, 0, 3, 1])


def test_fused_all_methods_in_one_batch(tiny_adapted, tiny_factors):
    adapters = [random_adapter(m, tiny_adapted.spec, tiny_factors, r, seed=i)
                for i, (m, r) in enumerate([("osora", 4), ("loraxs", 8), ("sorsa", 4), ("vera", 8),
                                            ("lora", 2), ("osora", R_MAX)])]
    load_all(tiny_adapted, tiny_factors, adapters)
    check_groups(tiny_adapted, [6, 0, 1, 2, 3, 4, 5, 1])


def test_rows_sharing_slots_beyond_the_kept_expansion(tiny_adapted, tiny_factors):
    """A batch with more rows than EXPAND_KEPT whose rows share slots (a prompt chunk's tokens): the table holds
    each distinct slot once and each row reads its slot's row; every row still equals W0 x + ΔW x."""
    from adapters.fused import EXPAND_KEPT

    adapters = [random_adapter("osora", tiny_adapted.spec, tiny_factors, r, seed=i) for i, r in enumerate([4, R_MAX])]
    load_all(tiny_adapted, tiny_factors, adapters)
    slots = [1] * 30 + [0] * 10 + [2] * 30 + [1] * 10
    assert len(slots) > EXPAND_KEPT
    batch = tiny_adapted.batch(slots)
    if tiny_adapted.kernels.startswith("cpu kernel"):  # the kernel reads the slot table through each row's slot
        assert batch.table is None and batch.slots.tolist() == slots
    else:
        assert batch.table.shape[0] == 3 and batch.table_rows is not None
    check_groups(tiny_adapted, slots)


def test_base_rows_are_the_base_model(tiny_adapted, tiny_factors):
    """A batch with no adapter uses W0 alone, bit for bit; a base row beside OSoRA rows stays within
    float rounding of it."""
    tiny_adapted.load(1, random_adapter("osora", tiny_adapted.spec, tiny_factors, 8, seed=1))
    g = torch.Generator().manual_seed(0)
    for group in tiny_adapted.fused:
        x = torch.randn(4, 1, group.k, generator=g)
        w0 = torch.cat([m.weight for m in group.members])
        with torch.inference_mode():
            assert torch.equal(group(x, tiny_adapted.batch([0] * 4)), torch.nn.functional.linear(x, w0))
            mixed = group(x, tiny_adapted.batch([0, 1, 0, 1]))
        torch.testing.assert_close(mixed[0], x[0] @ w0.T, atol=1e-5, rtol=0)
        assert (mixed[1] - x[1] @ w0.T).abs().max() > 1e-4  # and the adapter row does differ


def test_merge_writes_through_fused_weights(tiny_adapted, tiny_factors):
    a = random_adapter("osora", tiny_adapted.spec, tiny_factors, 8, seed=2)
    tiny_adapted.load(1, a)
    before = [g.weight.clone() for g in tiny_adapted.fused]
    unmerged = {}
    x = torch.randn(2, 1, tiny_adapted.fused[0].k)
    with torch.inference_mode():
        for g in tiny_adapted.fused:
            if g.k == x.shape[-1]:
                unmerged[id(g)] = g(x, tiny_adapted.batch([1, 1]))
    tiny_adapted.merge(a)
    batch = tiny_adapted.batch([1, 1])
    assert batch.empty  # served merged: no adapter path, the weights hold W0 + ΔW
    with torch.inference_mode():
        for g in tiny_adapted.fused:
            if id(g) in unmerged:
                torch.testing.assert_close(g(x, batch), unmerged[id(g)], atol=1e-4, rtol=0)
    tiny_adapted.unmerge()
    for g, w in zip(tiny_adapted.fused, before):
        assert torch.equal(g.weight, w)
    check_groups(tiny_adapted, [1, 0])


def test_batch_is_reused_until_slots_or_residency_change(tiny_adapted, tiny_factors):
    tiny_adapted.load(1, random_adapter("osora", tiny_adapted.spec, tiny_factors, 4, seed=1))
    b = tiny_adapted.batch([1, 0])
    assert tiny_adapted.batch([1, 0]) is b
    assert tiny_adapted.batch([0, 1]) is not b
    tiny_adapted.load(2, random_adapter("osora", tiny_adapted.spec, tiny_factors, 8, seed=2))
    b2 = tiny_adapted.batch([1, 2])
    assert b2.rank == 8
    assert b2.table is None if tiny_adapted.kernels.startswith("cpu kernel") else torch.equal(b2.table, tiny_adapted.table[[1, 2]])
    tiny_adapted.unload(2)  # slot 2 is now empty: the old batch must not be served again
    with pytest.raises(KeyError):
        tiny_adapted.batch([1, 2])


def test_fused_qkv_with_bias():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = from_module(Qwen2ForCausalLM(cfg).eval())
    factors = compute_factors(base.targets, R_MAX, progress=False)
    adapted = AdaptedModel(base, factors, n_slots=3)
    assert any(m.bias is not None for g in adapted.fused for m in g.members)
    adapted.load(1, random_adapter("osora", adapted.spec, factors, 8, seed=1))
    adapted.load(2, random_adapter("loraxs", adapted.spec, factors, 4, seed=2))
    check_groups(adapted, [1, 0, 2, 1])
