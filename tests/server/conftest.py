"""Tiny adapted models for the engine tests (CPU, seconds)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.factors import compute_factors
from adapters.file import BaseSpec
from adapters.runtime import AdaptedModel
from adapters.synthetic import random_adapter
from tests.conftest import tiny_chat_model

R_MAX = 16
N_SLOTS = 8


def adapted_pair(base, n_slots: int = N_SLOTS) -> tuple[AdaptedModel, torch.nn.Module]:
    """(AdaptedModel over `base`, an untouched copy of the HF model as the reference)."""
    reference = copy.deepcopy(base.model).eval()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    return AdaptedModel(base, factors, n_slots=n_slots), reference


@pytest.fixture
def tiny(tiny_chat_base):
    """(AdaptedModel, reference HF model, tokenizer) on the suite's tiny random Llama."""
    adapted, reference = adapted_pair(tiny_chat_base)
    return adapted, reference, tiny_chat_base.tokenizer


@pytest.fixture(scope="module")
def model():
    """(BaseSpec, factors) of the tiny random Llama: what the store tests validate adapters against."""
    base = tiny_chat_model()
    factors = compute_factors(base.targets, R_MAX, progress=False)
    return BaseSpec(shapes=base.shapes(), r_max=R_MAX, fingerprint=base.fingerprint), factors


def make_adapter(adapted: AdaptedModel, method: str, seed: int, rank: int = 8, strength: float = 0.5):
    return random_adapter(method, adapted.spec, adapted.factors, rank=rank, seed=seed, strength=strength)


def dense_reference(reference: torch.nn.Module, adapted: AdaptedModel, adapter) -> torch.nn.Module:
    """A copy of the HF model with W0 + method.dense_delta written into every adapted weight."""
    from adapters.methods import get_method

    model = copy.deepcopy(reference)
    method = get_method(adapter.method)
    with torch.no_grad():
        for name, p in adapter.layers.items():
            delta = method.dense_delta(p, adapted.factors[name], adapter.rank, adapter.scale, adapter.glob)
            model.get_submodule(name).weight += delta
    return model


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Plain loop: full HF forward over the whole sequence, argmax, n times (stops after eos)."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
        if t == eos:
            break
    return out
