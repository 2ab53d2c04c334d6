"""The served grammar mask against a per-token plain-Python reference, and the special tokens no constrained
text may contain (xgrammar alone would let them into a JSON string)."""

from __future__ import annotations

import torch

from server.grammar import GrammarSpec, Grammars, apply_masks
from server.grammar.compile import refused_bits
from server.grammar.masks import masked
from tests.conftest import tiny_tokenizer


def reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for r in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def test_masked_equals_the_reference_for_random_bitmasks():
    g = torch.Generator().manual_seed(0)
    for V in (31, 32, 33, 100):
        logits = torch.randn(5, V, generator=g)
        bitmask = torch.randint(-2**31, 2**31 - 1, (5, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        assert torch.equal(masked(logits, bitmask), reference(logits, bitmask))


def test_refused_bits_clear_exactly_the_special_ids_but_eos():
    bits = refused_bits([0, 2, 5, 33, 64], eos_ids=[2])
    full = torch.full((1, 3), -1, dtype=torch.int32)
    for word, keep in bits:
        full[0, word] &= keep
    allowed = [t for t in range(96) if (int(full[0, t // 32]) >> (t % 32)) & 1]
    assert set(range(96)) - set(allowed) == {0, 5, 33, 64}


def test_special_tokens_never_inside_a_constrained_string():
    tok = tiny_tokenizer()  # <pad> 0, <eos> 1, <unk> 2, then characters
    grammars = Grammars(tok, len(tok), eos_ids=[1])
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    m = grammars.matcher(grammars.compile(GrammarSpec.json_schema(schema)))
    for t in tok.encode('{"s": "ab'):
        assert m.accept_token(t)
    row = apply_masks(torch.zeros(2, len(tok)), [m, None])
    allowed = set(torch.isfinite(row[0]).nonzero().flatten().tolist())
    assert allowed.isdisjoint({0, 1, 2}) and tok.convert_tokens_to_ids("x") in allowed
    assert torch.isfinite(row[1]).all()  # the unconstrained row is untouched
    for t in tok.encode('"}'):
        assert m.accept_token(t)
    row = apply_masks(torch.zeros(1, len(tok)), [m])
    assert torch.isfinite(row[0]).nonzero().flatten().tolist() == [1]  # only the end remains
