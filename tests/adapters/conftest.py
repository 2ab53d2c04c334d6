"""Tiny random Llama models for the adapters tests (seconds, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.base_model import from_module
from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel

R_MAX = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_base():
    return from_module(tiny_llama())


@pytest.fixture
def tiny_factors(tiny_base):
    return compute_factors(tiny_base.targets, R_MAX, progress=False)


@pytest.fixture(params=[True, False], ids=["kernel", "torch"])
def tiny_adapted(request, tiny_base, tiny_factors):
    """Served both ways: OSoRA rows through the native CPU kernel (where a compiler is present) and through
    the torch composition; every test of the serving path holds for each."""
    return AdaptedModel(tiny_base, tiny_factors, n_slots=10, kernels=request.param)
