"""Fair admission across tenants: the FairQueue on its own, and the scheduler with hand-built outputs."""

from __future__ import annotations

import pytest

from server.fair_queue import FairQueue
from server.sequence import Detokenizer, SamplingParams, Sequence
from tests.server.test_scheduler import EOS, chars, sched, step


def tseq(tenant: str, i: int, **params) -> Sequence:
    prompt = [2, 3, 4]
    return Sequence(f"{tenant}{i}", prompt, SamplingParams(**params), Detokenizer(chars, prompt), tenant=tenant)


def drain(q: FairQueue) -> list[str]:
    out = []
    while q:
        assert q.peek() is (s := q.popleft())
        out.append(s.request_id)
    return out


@pytest.mark.parametrize("arrivals,weights,order", [
    ("AAABBBCCC", {}, "A0 B0 C0 A1 B1 C1 A2 B2 C2"),
    ("AAAAAABBB", {"A": 2}, "A0 A1 B0 A2 A3 B1 A4 A5 B2"),
    ("AAAB", {}, "A0 B0 A1 A2"),
    ("", {}, ""),
])
def test_round_robin_order(arrivals, weights, order):
    q = FairQueue(lambda t: weights.get(t, 1))
    counts: dict[str, int] = {}
    for t in arrivals:
        q.append(tseq(t, counts.setdefault(t, 0)))
        counts[t] += 1
    assert len(q) == len(arrivals)
    assert drain(q) == order.split()


def test_remove_iter_count_and_rejoining_the_rotation():
    q = FairQueue()
    a0, a1, b0 = tseq("A", 0), tseq("A", 1), tseq("B", 0)
    for s in (a0, a1, b0):
        q.append(s)
    assert [s.request_id for s in q] == ["A0", "A1", "B0"] and q.count("A") == 2 and q.tenants() == ["A", "B"]
    q.remove(b0)  # B leaves the rotation
    assert q.tenants() == ["A"]
    with pytest.raises(ValueError):
        q.remove(b0)
    assert q.popleft() is a0
    q.append(b1 := tseq("B", 1))  # B joins again, behind A
    assert drain(q) == ["A1", "B1"] and not q
    with pytest.raises(IndexError):
        q.peek()


def test_a_flood_from_one_tenant_does_not_starve_another():
    """Tenant A has 200 requests waiting; B sends one: B runs within one batch turnover."""
    s = sched(max_batch_size=4, max_queue=512, max_model_len=64)
    for i in range(200):
        s.add(tseq("A", i, max_tokens=3))
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["A0", "A1", "A2", "A3"]
    s.add(tseq("B", 0, max_tokens=3))
    admitted: list[str] = []
    for _ in range(10):  # the running four finish (EOS), freeing the batch once
        out, _ = step(s, {q.request_id: EOS for q in s.running})
        if out.prefill:
            admitted += [q.request_id for q in out.seqs]
        if "B0" in admitted:
            break
    assert "B0" in admitted[:4], admitted


def test_aborting_one_tenants_waiting_request_keeps_the_others_order():
    s = sched(max_batch_size=1, max_queue=16)
    for t, i in [("A", 0), ("A", 1), ("B", 0), ("C", 0), ("B", 1)]:
        s.add(tseq(t, i, max_tokens=1))
    s.abort("B0")
    admitted = []
    for _ in range(6):
        out, _ = step(s, {})
        admitted += [q.request_id for q in out.seqs if out.prefill]
    assert admitted == ["A0", "B1", "C0", "A1"]
