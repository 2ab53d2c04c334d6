"""Our forward (server/model.py) against the Hugging Face forward on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from server.model import DecoderModel

from .conftest import make_adapter

ATOL = 1e-4


@torch.no_grad()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]


def prefill(m: DecoderModel, prompts: list[list[int]], row0: int, batch=None) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    last = torch.tensor([len(p) - 1 for p in prompts])
    return m.prefill(tokens, last, row0, batch)


def decode(m: DecoderModel, seqs: list[list[int]], batch=None) -> torch.Tensor:
    """One decode step for rows 0..B-1: the last token of each sequence is the input."""
    tokens = torch.tensor([s[-1] for s in seqs])
    pos = torch.tensor([len(s) - 1 for s in seqs])
    return m.decode(tokens, pos, int(pos.max()) + 1, batch)


def run_and_compare(adapted, ref_logits, batch_for, slots: list[int]) -> None:
    """Prefill three prompts of different lengths together, a fourth later, then decode steps;
    every row's logits must equal `ref_logits(row, ids)` at every step."""
    m = DecoderModel(adapted.model, max_rows=6, max_len=64)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 11, 2, 7)]
    with torch.inference_mode():
        got = prefill(m, seqs[:3], 0, batch_for(slots[:3]))
        for row in range(3):
            torch.testing.assert_close(got[row], ref_logits(row, seqs[row]), atol=ATOL, rtol=0)
        got = prefill(m, seqs[3:], 3, batch_for(slots[3:]))
        torch.testing.assert_close(got[0], ref_logits(3, seqs[3]), atol=ATOL, rtol=0)
        for step in range(4):
            for s in seqs:
                s.append(int(torch.randint(3, 128, (1,), generator=g)))
            got = decode(m, seqs, batch_for(slots))
            for row, s in enumerate(seqs):
                torch.testing.assert_close(got[row], ref_logits(row, s), atol=ATOL, rtol=0,
                                           msg=f"row {row}, decode step {step}")


def test_base_prefill_and_decode_match_hf(tiny):
    adapted, reference, _ = tiny
    run_and_compare(adapted, lambda row, ids: hf_last_logits(reference, ids), lambda s: None, [0, 0, 0, 0])


def test_mixed_adapters_match_hf_under_use(tiny):
    adapted, _, _ = tiny
    for slot, (method, seed) in enumerate([("osora", 1), ("loraxs", 2), ("lora", 3)], start=1):
        adapted.load(slot, make_adapter(adapted, method, seed))
    slots = [1, 0, 2, 3]

    def ref(row, ids):
        with adapted.use(adapted.batch([slots[row]])):
            return hf_last_logits(adapted.model, ids)

    run_and_compare(adapted, ref, adapted.batch, slots)


def test_adapter_changes_logits(tiny):
    adapted, reference, _ = tiny
    adapted.load(1, make_adapter(adapted, "osora", 5))
    m = DecoderModel(adapted.model, max_rows=2, max_len=16)
    with torch.inference_mode():
        got = prefill(m, [[5, 6, 7], [5, 6, 7]], 0, adapted.batch([0, 1]))
    assert (got[0] - got[1]).abs().max() > 1e-3


def test_rejects_unsupported_configs(tiny):
    adapted, _, _ = tiny
    cfg = adapted.model.config
    cfg.sliding_window = 8
    with pytest.raises(ValueError, match="sliding-window"):
        DecoderModel(adapted.model, max_rows=1, max_len=16)
    cfg.sliding_window = None
    cfg.model_type = "gpt2"
    with pytest.raises(ValueError, match="not supported"):
        DecoderModel(adapted.model, max_rows=1, max_len=16)
