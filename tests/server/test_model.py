"""Our forward (server/model.py) against the Hugging Face forward on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from server.model import DecoderModel
from server.model_runner import padded_table

from .conftest import make_adapter

ATOL = 1e-4


@torch.no_grad()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]


BS = 4  # tokens per KV block: small, so that sequences span several blocks


class Paged:
    """A DecoderModel with a hand-run block allocator: sequence i owns the blocks it is given, in order."""

    def __init__(self, adapted, num_blocks: int = 64, max_len: int = 64):
        self.m = DecoderModel(adapted.model, num_blocks, BS, max_len)
        self.next, self.tables = 1, {}  # block 0 is the null block

    def table(self, i: int, n_tokens: int) -> list[int]:
        t = self.tables.setdefault(i, [])
        while len(t) * BS < n_tokens:
            t.append(self.next)
            self.m.cache.zero([self.next])  # a fresh block holds garbage (torch.empty)
            self.next += 1
        return t

    def prefill(self, rows: list[int], chunks: list[list[int]], ctx: list[int], batch_for=None,
                slots: list[int] | None = None) -> torch.Tensor:
        """Prefill the chunks; with `batch_for`, chunk j's tokens use adapter slot slots[j]."""
        tables = [self.table(i, n + len(c)) for i, c, n in zip(rows, chunks, ctx)]
        batch = None if batch_for is None else batch_for([s for s, c in zip(slots, chunks) for _ in c])
        return self.m.prefill(chunks, ctx, tables, batch)

    def decode(self, seqs: list[list[int]], batch=None, ids: list[int] | None = None, slots=None,
               batch_for=None) -> torch.Tensor:
        """One decode step for the sequences (ids: their table numbers, default 0..B-1): the last token of each
        is the input. With `ids`, rows go where the decode workspace assigns them (kept across steps), as the
        runner does, and the batch is `batch_for(slots in row order)`; the logits come back in the order of
        `seqs`."""
        keep = ids is not None
        ids = ids if keep else list(range(len(seqs)))
        rows = self.m.workspace.assign(ids) if keep else list(range(len(seqs)))
        order = sorted(range(len(seqs)), key=rows.__getitem__)
        tokens = torch.tensor([seqs[j][-1] for j in order])
        pos = torch.tensor([len(seqs[j]) - 1 for j in order])
        tables = [self.table(ids[j], len(seqs[j])) for j in order]
        if batch_for is not None:
            batch = batch_for([slots[j] for j in order])
        logits = self.m.decode(tokens, pos, padded_table(tables, self.m.device), batch, keep)
        return logits[torch.tensor(rows)]


def run_and_compare(adapted, ref_logits, batch_for, slots: list[int]) -> None:
    """Prefill three prompts of different lengths together, a fourth in two chunks (the second continuing its
    cached context), then decode steps; every row's logits must equal `ref_logits(row, ids)` at every step."""
    m = Paged(adapted)
    m.m.workspace.SLACK = 1  # the decode workspace outgrows itself every few steps: rebuilt, else reused
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 11, 2, 7)]
    with torch.inference_mode():
        got = m.prefill([0, 1, 2], seqs[:3], [0, 0, 0], batch_for, slots[:3])
        for row in range(3):
            torch.testing.assert_close(got[row], ref_logits(row, seqs[row]), atol=ATOL, rtol=0)
        m.prefill([3], [seqs[3][:3]], [0], batch_for, slots[3:])
        got = m.prefill([3], [seqs[3][3:]], [3], batch_for, slots[3:])
        torch.testing.assert_close(got[0], ref_logits(3, seqs[3]), atol=ATOL, rtol=0)
        live = [0, 1, 2, 3]
        for step in range(12):
            if step == 5:
                live = [0, 2, 3]  # one leaves: the top row moves into its hole
            if step == 8:
                live = [0, 1, 2, 3]  # and comes back (its blocks gathered into a free row)
            for i in live:
                seqs[i].append(int(torch.randint(3, 128, (1,), generator=g)))
            got = m.decode([seqs[i] for i in live], ids=live, slots=[slots[i] for i in live], batch_for=batch_for)
            for r, i in enumerate(live):
                torch.testing.assert_close(got[r], ref_logits(i, seqs[i]), atol=ATOL, rtol=0,
                                           msg=f"sequence {i}, decode step {step}")
    ws = m.m.workspace
    assert 1 < ws.rebuilds < 12 and ws.gathered_rows < 4 * ws.rebuilds + 2


def test_chunks_with_context_in_one_batch_match_hf(tiny):
    """Two sequences each prefilled in a first chunk, then their second chunks together (different context
    lengths, right-padded): logits equal the full forward."""
    adapted, reference, _ = tiny
    m = Paged(adapted)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (13, 6)]
    with torch.inference_mode():
        m.prefill([0, 1], [seqs[0][:6], seqs[1][:1]], [0, 0])
        got = m.prefill([0, 1], [seqs[0][6:], seqs[1][1:]], [6, 1])
    for row, s in enumerate(seqs):
        torch.testing.assert_close(got[row], hf_last_logits(reference, s), atol=ATOL, rtol=0)


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
    m = Paged(adapted)
    with torch.inference_mode():
        got = m.prefill([0, 1], [[5, 6, 7], [5, 6, 7]], [0, 0], adapted.batch, [0, 1])
    assert (got[0] - got[1]).abs().max() > 1e-3


def test_rejects_unsupported_configs(tiny):
    adapted, _, _ = tiny
    cfg = adapted.model.config
    cfg.sliding_window = 8
    with pytest.raises(ValueError, match="sliding-window"):
        DecoderModel(adapted.model, num_blocks=8, block_size=BS, max_len=16)
    cfg.sliding_window = None
    cfg.model_type = "gpt2"
    with pytest.raises(ValueError, match="not supported"):
        DecoderModel(adapted.model, num_blocks=8, block_size=BS, max_len=16)


@pytest.mark.parametrize("slots", [[0, 0, 0, 0], [1, 2, 0, 3]], ids=["base", "adapters"])
def test_decode_rows_and_chunks_in_one_forward_match_hf(tiny, slots):
    """`mixed`: two decoding sequences and two prompt chunks (a fresh one and one continuing its cached
    context, different lengths) in one forward, each token a row with its sequence's adapter: every row's
    logits equal the full forward's, and the kept hidden states give each chunk's per-position logits."""
    adapted, _, _ = tiny
    for slot, (method, seed) in enumerate([("osora", 1), ("vera", 2), ("lora", 3)], start=1):
        adapted.load(slot, make_adapter(adapted, method, seed))

    def ref(row, ids):
        with torch.inference_mode(), adapted.use(adapted.batch([slots[row]])):
            return adapted.model(torch.tensor([ids])).logits[0]

    m = Paged(adapted)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (6, 9, 7, 10)]
    with torch.inference_mode():
        m.prefill([0, 1], [seqs[0][:-1], seqs[1][:-1]], [0, 0], adapted.batch, slots[:2])
        m.prefill([3], [seqs[3][:5]], [0], adapted.batch, slots[3:])
        dec = [seqs[0], seqs[1]]  # decode their last tokens; sequence 2 starts, sequence 3 continues
        tokens = torch.tensor([s[-1] for s in dec])
        pos = torch.tensor([len(s) - 1 for s in dec])
        table = padded_table([m.table(i, len(s)) for i, s in enumerate(dec)], m.m.device)
        chunks, ctx = [seqs[2], seqs[3][5:]], [0, 5]
        rows = slots[:2] + [slots[2]] * 7 + [slots[3]] * 5  # a row per token
        keep = {0: None, 1: None}
        dl, cl = m.m.mixed(tokens, pos, table, False, 2, chunks, ctx, [m.table(2, 7), m.table(3, 10)],
                           adapted.batch(rows), keep)
    for r in range(2):
        torch.testing.assert_close(dl[r], ref(r, seqs[r])[-1], atol=ATOL, rtol=0)
    for c, i in enumerate((2, 3)):
        full = ref(i, seqs[i])
        torch.testing.assert_close(cl[c], full[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(m.m.logits_of(keep[c]), full[ctx[c]:], atol=ATOL, rtol=0)
