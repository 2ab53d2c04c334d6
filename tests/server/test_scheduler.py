"""The scheduler on its own: hand-built model outputs, no model, no torch."""

from __future__ import annotations

import pytest

from server.fair_queue import FairQueue
from server.kv.blocks import BlockManager
from server.scheduler import QueueFull, Scheduler
from server.sequence import Detokenizer, SampledToken, SamplingParams, Sequence, Status

EOS = 1


class BaseOnly:
    """Residency for base-model requests only (the adapter paths are tested in test_residency)."""

    def acquire(self, key, adapter):
        assert key is None
        return 0

    def release(self, key):
        pass

    def admits(self, key, group):
        return True

    def merge_target(self, running):
        return None


def chars(ids: list[int]) -> str:
    return "".join(chr(96 + i) for i in ids if i != EOS)  # 2 -> 'b', 3 -> 'c', ...


def seq(i: int, n_prompt: int = 3, tenant: str = "", **params) -> Sequence:
    """Request "r{i}" in open mode (tenant ""), else "{tenant}{i}" (tenant "A", i 0 -> "A0")."""
    prompt = list(range(2, 2 + n_prompt))
    return Sequence(f"{tenant or 'r'}{i}", prompt, SamplingParams(**params), Detokenizer(chars, prompt),
                    tenant=tenant)


def sched(**kw) -> Scheduler:
    args = dict(max_batch_size=4, max_model_len=32, max_queue=8, eos_ids={EOS}, slots=BaseOnly())
    return Scheduler(**(args | kw))


def step(s: Scheduler, tokens: dict[str, int]):
    """schedule, then feed `tokens[request_id]` (default 5) as the sampled token of every sequence that
    samples (None for a prompt chunk that does not end its prompt)."""
    out = s.schedule()
    changed = s.update(out, [SampledToken(tokens.get(q.request_id, 5)) if smp else None
                             for q, smp in zip(out.seqs, out.sample)])
    return out, changed


def test_prefill_then_decode_with_positions_and_blocks():
    s = sched(kv=BlockManager(16, 4))
    for i in range(3):
        s.add(seq(i, n_prompt=2 + i))
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["r0", "r1", "r2"] and out.sample == [True] * 3
    assert out.positions == [0, 0, 0] and out.token_ids[1] == [2, 3, 4]
    assert out.block_tables == [[1], [2], [3]] and out.zero_blocks == [1, 2, 3]  # fresh blocks are zeroed
    out, _ = step(s, {"r1": 7})
    assert not out.prefill and out.token_ids == [[5], [5], [5]] and out.positions == [2, 3, 4]
    assert out.block_tables == [[1], [2], [3, 4]] and out.zero_blocks == [4]  # r2's 5th token: a new block
    out, _ = step(s, {})
    assert out.token_ids == [[5], [7], [5]] and out.positions == [3, 4, 5]
    assert out.block_tables == [[1], [2, 5], [3, 4]]


def test_batch_size_limit_and_admission_between_decodes():
    s = sched(max_batch_size=2)
    for i in range(3):
        s.add(seq(i, max_tokens=2))
    out, _ = step(s, {})
    assert len(out.seqs) == 2 and len(s.waiting) == 1
    out, changed = step(s, {})
    assert not out.prefill and all(q.status is Status.FINISHED for q in changed)
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["r2"]
    assert out.finished_ids == ["r0", "r1"]


def test_queue_full():
    s = sched(max_queue=2)
    s.add(seq(0))
    s.add(seq(1))
    with pytest.raises(QueueFull):
        s.add(seq(2))


@pytest.mark.parametrize("params, tokens, reason, n", [
    ({"max_tokens": 3}, [5, 5, 5, 5], "length", 3),
    ({"max_tokens": 9}, [5, EOS, 5], "stop", 2),
    ({"max_tokens": 9, "ignore_eos": True}, [5, EOS, 5, 5, 5, 5, 5, 5, 5], "length", 9),
    ({"max_tokens": 9, "stop": ("fg",)}, [5, 6, 7, 8], "stop", 3),
    ({"max_tokens": 40}, [5] * 40, "length", 29),  # max_model_len 32 - 3 prompt tokens
])
def test_finish_reasons(params, tokens, reason, n):
    s = sched()
    s.add(seq(0, **params))
    for t in tokens:
        out, changed = step(s, {"r0": t})
        if changed and changed[0].status is Status.FINISHED:
            break
    q = changed[0]
    assert q.finish_reason == reason and len(q.output_ids) == n
    assert not s.running


def test_stop_string_is_cut_and_never_sent():
    s = sched()
    s.add(seq(0, max_tokens=20, stop=("xyz", "fgh")))
    sent = ""
    for t in [2, 3, 4, 5, 6, 7, 8, 9]:  # b c d e f g h ...
        _, changed = step(s, {"r0": t})
        text, _, _ = changed[0].take_new()
        sent += text
        if changed[0].status is Status.FINISHED:
            break
    assert changed[0].finish_reason == "stop" and sent == "bcde" and changed[0].text == "bcde"


def test_finished_sequences_free_their_blocks_tail_first():
    kv = BlockManager(16, 4)
    s = sched(kv=kv)
    for i in range(2):
        s.add(seq(i, n_prompt=9, max_tokens=9 if i == 0 else 1))
    out, _ = step(s, {})  # r1 finishes at once: its blocks go back, last block first
    assert out.block_tables == [[1, 2, 3], [4, 5, 6]] and kv.num_used == 3
    assert list(kv.free)[-3:] == [6, 5, 4]
    out, _ = step(s, {})
    assert out.finished_ids == ["r1"] and [q.request_id for q in out.seqs] == ["r0"]


def test_abort_waiting_and_running():
    s = sched(max_batch_size=1)
    s.add(seq(0, max_tokens=9))
    s.add(seq(1))
    step(s, {})
    s.abort("r0")
    s.abort("r1")
    out = s.schedule()
    assert {q.request_id for q in out.aborted} == {"r0", "r1"} and out.empty
    changed = s.update(out, [])
    assert all(q.finish_reason == "abort" for q in changed) and not s.running and not s.waiting


def test_token_budget_splits_admission():
    s = sched(max_num_batched_tokens=8)
    for i in range(3):
        s.add(seq(i, n_prompt=4))
    out = s.schedule()
    assert len(out.seqs) == 2 and out.num_tokens == 8  # 3 x 4 tokens would exceed 8


def test_detokenizer_holds_incomplete_characters():
    def utf8(ids):
        return bytes(ids).decode("utf-8", errors="replace")
    d = Detokenizer(utf8, [ord("a")])
    euro = list("€".encode())
    assert d.step(euro[0]) == "" and d.step(euro[1]) == "" and d.step(euro[2]) == "€"
    assert d.step(ord("b")) == "b"


# ---- fair admission across tenants ------------------------------------------------------------------

def add_all(s: Scheduler | FairQueue, arrivals: str, **params) -> list[Sequence]:
    """One request per letter, in that order: "ABA" -> A0, B0, A1 ("-" is open mode: r0, r1, ...)."""
    counts: dict[str, int] = {}
    seqs = []
    for t in arrivals:
        tenant = "" if t == "-" else t
        seqs.append(seq(counts.get(tenant, 0), tenant=tenant, **params))
        counts[tenant] = counts.get(tenant, 0) + 1
        s.add(seqs[-1]) if isinstance(s, Scheduler) else s.append(seqs[-1])
    return seqs


def prefills(s: Scheduler, steps: int | None = None) -> list[list[str]]:
    """Run `steps` steps (None: until idle), the sequences sampling 5 at their prefill and EOS at their first
    decode; the request ids starting their prompt in each step that starts one, in order."""
    out = []
    for _ in range(steps if steps is not None else 1000):
        if steps is None and not s.has_work:
            return out
        sched_out, _ = step(s, {q.request_id: EOS for q in s.running})
        started = [q.request_id for q, p in zip(sched_out.seqs, sched_out.positions) if p == 0]
        if started:
            out.append(started)
    assert steps is not None, f"still busy after 1000 steps: {out}"
    return out


def test_a_flood_from_one_tenant_does_not_starve_another():
    """The issue's acceptance test: tenant A has 200 requests waiting, then B sends one. With a batch of 4, B
    is in the first prefill after it arrives: the running A requests finish, and of the 4 freed rows B gets one."""
    s = sched(max_batch_size=4, max_queue=256)
    add_all(s, "A" * 200, max_tokens=8)
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["A0", "A1", "A2", "A3"]
    assert len(s.waiting) == 196
    add_all(s, "B", max_tokens=8)
    out, _ = step(s, {q.request_id: EOS for q in s.running})  # batch full: decode, and all four finish
    assert not out.prefill and not s.running
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["A4", "B0", "A5", "A6"]
    assert s.waiting.tenants() == ["A"] and len(s.waiting) == 193


@pytest.mark.parametrize("arrivals, weights, batch, order", [
    ("AAABBBCCC", {}, 1, "A0 B0 C0 A1 B1 C1 A2 B2 C2"),  # three tenants take turns
    ("AAABBBCCC", {}, 9, "A0 B0 C0 A1 B1 C1 A2 B2 C2"),  # ... also within one prefill
    ("AAAABB", {"A": 2}, 1, "A0 A1 B0 A2 A3 B1"),  # weights 2:1
    ("AAAAAAB", {"A": 2}, 1, "A0 A1 B0 A2 A3 A4 A5"),  # once B has no more, A runs on alone
    ("BBBAAAAAA", {"A": 3, "B": 1}, 1, "B0 A0 A1 A2 B1 A3 A4 A5 B2"),
    ("AAABB", {"A": 0}, 1, "A0 B0 A1 B1 A2"),  # a weight of 0 or less counts as 1
    ("ABBABAB", {}, 1, "A0 B0 A1 B1 A2 B2 B3"),  # first come, first served within a tenant
    ("BAAAAB", {}, 2, "B0 A0 B1 A1 A2 A3"),
    ("-----", {}, 1, "r0 r1 r2 r3 r4"),  # open mode (one tenant, ""): plain FCFS, as before
    ("--A-A", {}, 1, "r0 A0 r1 A1 r2"),
])
def test_admission_order(arrivals, weights, batch, order):
    s = sched(max_batch_size=batch, max_queue=16, weight=lambda t: weights.get(t, 1))
    add_all(s, arrivals, max_tokens=8)
    admitted = [r for p in prefills(s) for r in p]
    assert admitted == order.split()
    for tenant in set(arrivals):  # FIFO within each tenant, whatever the interleaving
        mine = [int(r[1:]) for r in admitted if r[0] == ("r" if tenant == "-" else tenant)]
        assert mine == sorted(mine)


def test_weights_are_read_when_a_turn_starts():
    weights = {"A": 3}
    s = sched(max_batch_size=1, max_queue=16, weight=lambda t: weights.get(t, 1))
    add_all(s, "AAAAAAABB", max_tokens=8)
    admitted = [r for p in prefills(s, steps=2) for r in p]  # A0 admitted, and finishes
    weights["A"] = 1  # A's current turn keeps its 3; the next one has 1
    admitted += [r for p in prefills(s) for r in p]
    assert admitted == "A0 A1 A2 B0 A3 B1 A4 A5 A6".split()


@pytest.mark.parametrize("aborts, order", [
    ("B0", "A0 B1 C0 A1 C1"),
    ("C0 C1", "A0 B0 A1 B1"),  # C leaves the rotation
    ("A0", "A1 B0 C0 B1 C1"),
    ("A1 B1 C1", "A0 B0 C0"),
    ("X0", "A0 B0 C0 A1 B1 C1"),  # unknown id: nothing happens
])
def test_aborting_a_waiting_request_keeps_the_others_order(aborts, order):
    s = sched(max_batch_size=1, max_queue=16)
    add_all(s, "AABBCC", max_tokens=8)
    for r in aborts.split():
        s.abort(r)
    out = s.schedule()
    assert sorted(q.request_id for q in out.aborted) == sorted(set(aborts.split()) - {"X0"})
    assert all(q.finish_reason == "abort" for q in out.aborted)
    s.update(out, [SampledToken(EOS) for _ in out.seqs])
    admitted = [q.request_id for q in out.seqs] + [r for p in prefills(s) for r in p]
    assert admitted == order.split()


@pytest.mark.parametrize("aborts, order", [
    ("C0 B2", "C1 A1 B1 C2 A2"),  # C0 was next: C's turn goes to C1; B leaves after B1
    ("C0 C1 C2", "A1 B1 A2 B2"),  # C, whose turn it was, leaves: the turn passes on to A
    ("A1 A2", "C0 B1 C1 B2 C2"),
])
def test_aborting_mid_rotation(aborts, order):
    s = sched(max_batch_size=1, max_queue=16)
    add_all(s, "AAABBBCCC", max_tokens=8)
    assert prefills(s, steps=4) == [["A0"], ["B0"]]  # each prefilled, then finished
    for r in aborts.split():
        s.abort(r)
    assert [r for p in prefills(s) for r in p] == order.split()


@pytest.mark.parametrize("arrivals, limit, expected", [
    # (tenant, prompt length) per arrival; the head never gets overtaken: a long prompt takes what the
    # budget leaves (a chunk) and ends the admissions of its step, even
    # where the next tenant's short prompt would have fitted
    ([("A", 3), ("B", 10), ("A", 3)], 12, [["A0", "B0"], ["A1"]]),
    ([("A", 3), ("B", 10), ("A", 3)], 30, [["A0", "B0", "A1"]]),
    ([("A", 3), ("A", 10), ("B", 3)], 12, [["A0", "B0", "A1"]]),  # A1 with a chunk of 6 (3 + 3 + 6 <= 12)
    ([("A", 8), ("B", 2), ("C", 2)], 12, [["A0", "B0", "C0"]]),
])
def test_the_head_is_never_overtaken(arrivals, limit, expected):
    s = sched(max_batch_size=4, max_queue=16, max_num_batched_tokens=limit)
    counts: dict[str, int] = {}
    for tenant, n in arrivals:
        s.add(seq(counts.get(tenant, 0), n_prompt=n, tenant=tenant, max_tokens=8))
        counts[tenant] = counts.get(tenant, 0) + 1
    assert prefills(s) == expected


def test_fair_queue():
    q = FairQueue(lambda t: {"A": 2}.get(t, 1))
    assert not q and len(q) == 0 and q.tenants() == [] and list(q) == []
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.popleft()
    a0, a1, b0, a2, c0, b1 = add_all(q, "AABACB")
    assert len(q) == 6 and q and q.tenants() == ["A", "B", "C"]
    assert [s.request_id for s in q] == ["A0", "A1", "A2", "B0", "B1", "C0"]  # rotation order, FIFO in each
    assert (q.count("A"), q.count("B"), q.count("C"), q.count("D")) == (3, 2, 1, 0)
    assert q.peek() is q.popleft() is a0 and q.peek() is q.popleft() is a1  # A's turn: 2 admissions
    assert q.tenants() == ["B", "C", "A"] and [s.request_id for s in q] == ["B0", "B1", "C0", "A2"]
    q.remove(c0)  # C leaves the rotation
    assert q.tenants() == ["B", "A"] and q.count("C") == 0
    with pytest.raises(ValueError):
        q.remove(c0)
    with pytest.raises(ValueError):
        q.remove(a0)  # admitted, so no longer waiting
    q.append(c1 := seq(1, tenant="C"))  # C joins again, at the end
    assert q.tenants() == ["B", "A", "C"]
    order = []
    while q:
        assert q.peek() is (s := q.popleft())
        order.append(s)
    assert order == [b0, a2, c1, b1] and len(q) == 0 and q.tenants() == []
