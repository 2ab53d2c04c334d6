"""Every method's fast batched path against its plain-torch dense reference, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from adapters.methods import REGISTRY, get_method
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter

from .conftest import R_MAX

# (method, ranks of the adapters mixed into one batch)
TEST_CASES = [
    ("osora", [4, 8, 16]),
    ("loraxs", [4, 8, 16]),
    ("sorsa", [4, 16, 8]),
    ("vera", [8, 8, 4]),
    ("lora", [2, 4, 8]),
]


def dense_reference(adapted: AdaptedModel, name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
    """W0 x + ΔW x with ΔW from the method's dense reference (slot 0: W0 x)."""
    layer = adapted.layers[name]
    w = layer.weight.float()
    a = adapted.resident[slot]
    if a is not None:
        w = w + get_method(a.method).dense_delta(a.layers[name], adapted.factors[name], a.rank, a.scale, a.glob)
    return x @ w.T


def load_all(adapted, factors, adapters):
    for slot, a in enumerate(adapters, start=1):
        adapted.load(slot, a)


def test_every_method_is_tested():
    assert {m for m, _ in TEST_CASES} == set(REGISTRY)


@pytest.mark.parametrize("method,ranks", TEST_CASES)
def test_mixed_batch_matches_dense_reference(tiny_adapted, tiny_factors, method, ranks):
    spec = tiny_adapted.spec
    adapters = [random_adapter(method, spec, tiny_factors, r, seed=i, alpha=2.0 * r if i == 1 else None,
                               vera_seed=i % 2) for i, r in enumerate(ranks)]
    load_all(tiny_adapted, tiny_factors, adapters)
    slots = [0, 1, 2, 3, 0, 3, 1]  # base rows mixed in, adapters repeated
    batch = tiny_adapted.batch(slots)
    g = torch.Generator().manual_seed(1)
    for name, layer in tiny_adapted.layers.items():
        x = torch.randn(len(slots), 5, layer.in_features, generator=g)
        y = layer(x, batch)
        # the base layer on the same batch: a base row gets exactly this, bit for bit (its delta is an exact
        # zero). Compared on the same batch shape because BLAS libraries may round a GEMM differently
        # for other shapes (a 1-row product need not match row 0 of a 7-row one in the last bit).
        base = torch.nn.functional.linear(x, layer.weight)
        for row, slot in enumerate(slots):
            ref = dense_reference(tiny_adapted, name, slot, x[row])
            torch.testing.assert_close(y[row], ref, atol=1e-4, rtol=0)
            if slot == 0:
                assert torch.equal(y[row], base[row])


def test_all_methods_in_one_batch(tiny_adapted, tiny_factors):
    spec = tiny_adapted.spec
    adapters = [random_adapter(m, spec, tiny_factors, ranks[1], seed=10 + i) for i, (m, ranks) in enumerate(TEST_CASES)]
    load_all(tiny_adapted, tiny_factors, adapters)
    slots = [5, 4, 3, 2, 1, 0, 1, 3]
    batch = tiny_adapted.batch(slots)
    assert set(batch.methods) == set(REGISTRY)
    for name, layer in tiny_adapted.layers.items():
        x = torch.randn(len(slots), 3, layer.in_features)
        y = layer(x, batch)
        for row, slot in enumerate(slots):
            torch.testing.assert_close(y[row], dense_reference(tiny_adapted, name, slot, x[row]), atol=1e-4, rtol=0)


def test_adapter_on_some_modules_only(tiny_adapted, tiny_factors):
    modules = [n for n in tiny_adapted.layers if n.endswith(("q_proj", "v_proj"))]
    for slot, method in enumerate(["osora", "lora", "vera"], start=1):
        tiny_adapted.load(slot, random_adapter(method, tiny_adapted.spec, tiny_factors, 4, seed=slot,
                                               modules=modules))
    batch = tiny_adapted.batch([1, 2, 3])
    for name, layer in tiny_adapted.layers.items():
        x = torch.randn(3, 2, layer.in_features)
        y = layer(x, batch)
        base = x @ layer.weight.T
        if name in modules:
            assert (y - base).abs().amax() > 1e-3
        else:
            assert torch.equal(y, base)


@pytest.mark.parametrize("method,ranks", TEST_CASES)
def test_merge_equals_unmerged_and_restore_is_bit_exact(tiny_adapted, tiny_factors, method, ranks):
    adapter = random_adapter(method, tiny_adapted.spec, tiny_factors, ranks[-1], seed=3)
    tiny_adapted.load(1, adapter)
    model = tiny_adapted.model
    before = {n: l.weight.detach().clone() for n, l in tiny_adapted.layers.items()}
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tiny_adapted.use(tiny_adapted.batch([1, 1])):
        unmerged = model(ids).logits
    tiny_adapted.merge(adapter)
    with torch.no_grad(), tiny_adapted.use(tiny_adapted.batch([1, 1])):
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError):
        tiny_adapted.batch([0, 1])  # base rows cannot run on merged weights
    tiny_adapted.unmerge()
    for n, l in tiny_adapted.layers.items():
        assert torch.equal(l.weight, before[n])


def test_osora_dense_delta_is_the_papers_weight(tiny_adapted, tiny_factors):
    """OSoRA's dense ΔW (merge, and the reference of the batched path) against the paper's literal weight:
    W' = W_res + diag(O) U_r diag(S') V_rᵀ with W_res = W0 − U_r diag(S_r) V_rᵀ."""
    a = random_adapter("osora", tiny_adapted.spec, tiny_factors, 8, seed=3)
    for name, p in a.layers.items():
        f = tiny_factors[name]
        U, S, V = f.U[:, :8].double(), f.S[:8].double(), f.V[:, :8].double()
        w0 = torch.randn(U.shape[0], V.shape[0], dtype=torch.float64)
        w_res = w0 - U @ torch.diag(S) @ V.T
        want = w_res + torch.diag(p["osora_O"].double()) @ U @ torch.diag(p["osora_S"].double()) @ V.T
        got = w0 + get_method("osora").dense_delta(p, f, 8, a.scale, a.glob).double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_identity_osora_leaves_logits_unchanged(tiny_adapted, tiny_factors):
    adapter = random_adapter("osora", tiny_adapted.spec, tiny_factors, R_MAX, seed=0)
    for name, p in adapter.layers.items():
        p["osora_S"] = tiny_factors[name].S.clone()
        p["osora_O"] = torch.ones_like(p["osora_O"])
    tiny_adapted.load(1, adapter)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_adapted.model(ids).logits
        with tiny_adapted.use(tiny_adapted.batch([1, 0, 1])):
            adapted = tiny_adapted.model(ids).logits
    torch.testing.assert_close(adapted, base, atol=1e-5, rtol=0)


def test_unload_frees_slot_and_zeroes_banks(tiny_adapted, tiny_factors):
    tiny_adapted.load(2, random_adapter("osora", tiny_adapted.spec, tiny_factors, 8, seed=1))
    tiny_adapted.unload(2)
    with pytest.raises(KeyError):
        tiny_adapted.batch([2])
    tiny_adapted.load(2, random_adapter("lora", tiny_adapted.spec, tiny_factors, 4, seed=1))
    layer = next(iter(tiny_adapted.layers.values()))
    assert layer.banks["osora"].a[2].abs().sum() == 0


def test_bfloat16_serving_close_to_reference(tiny_base, tiny_factors):
    adapted = AdaptedModel(tiny_base, tiny_factors, n_slots=3, dtype=torch.bfloat16)
    adapted.load(1, random_adapter("osora", adapted.spec, tiny_factors, 8, seed=2))
    name, layer = next(iter(adapted.layers.items()))
    x = torch.randn(2, 4, layer.in_features)
    y = layer(x.bfloat16(), adapted.batch([1, 0])).float()
    ref = dense_reference(adapted, name, 1, x[0])
    assert (y[0] - ref).abs().max() < 0.05 * ref.abs().max()
