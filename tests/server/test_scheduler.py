"""The scheduler on its own: hand-built model outputs, no model, no torch."""

from __future__ import annotations

import pytest

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


def seq(i: int, n_prompt: int = 3, **params) -> Sequence:
    prompt = list(range(2, 2 + n_prompt))
    return Sequence(f"r{i}", prompt, SamplingParams(**params), Detokenizer(chars, prompt))


def sched(**kw) -> Scheduler:
    args = dict(max_batch_size=4, max_model_len=32, max_queue=8, eos_ids={EOS}, slots=BaseOnly())
    return Scheduler(**(args | kw))


def step(s: Scheduler, tokens: dict[str, int]):
    """schedule, then feed `tokens[request_id]` (default 5) as every sequence's sampled token."""
    out = s.schedule()
    changed = s.update(out, [SampledToken(tokens.get(q.request_id, 5)) for q in out.seqs])
    return out, changed


def test_prefill_then_decode_with_positions_and_rows():
    s = sched()
    for i in range(3):
        s.add(seq(i, n_prompt=2 + i))
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["r0", "r1", "r2"]
    assert out.rows == [0, 1, 2] and out.positions == [0, 0, 0] and out.token_ids[1] == [2, 3, 4]
    out, _ = step(s, {"r1": 7})
    assert not out.prefill and out.token_ids == [[5], [5], [5]] and out.positions == [2, 3, 4]
    out, _ = step(s, {})
    assert out.token_ids == [[5], [7], [5]] and out.positions == [3, 4, 5]


def test_batch_size_limit_and_admission_between_decodes():
    s = sched(max_batch_size=2)
    for i in range(3):
        s.add(seq(i, max_tokens=2))
    out, _ = step(s, {})
    assert len(out.seqs) == 2 and len(s.waiting) == 1
    out, changed = step(s, {})
    assert not out.prefill and all(q.status is Status.FINISHED for q in changed)
    out, _ = step(s, {})
    assert out.prefill and [q.request_id for q in out.seqs] == ["r2"] and out.rows == [0]
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


def test_finished_rows_are_compacted_with_moves():
    s = sched()
    for i in range(4):
        s.add(seq(i, max_tokens=9 if i in (0, 3) else 2))
    step(s, {})  # prefill: rows 0..3
    _, changed = step(s, {})  # r1 and r2 reach max_tokens
    assert [q.request_id for q in s.running] == ["r0", "r3"] and [q.row for q in s.running] == [0, 1]
    out, _ = step(s, {})
    assert out.cache_moves == [(3, 1, 4)]  # r3: 3 prompt tokens + its first output (the second is the input)
    assert out.rows == [0, 1] and sorted(out.finished_ids) == ["r1", "r2"]


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


def test_prefill_token_budget_splits_admission():
    s = sched(max_prefill_tokens=8)
    for i in range(3):
        s.add(seq(i, n_prompt=4))
    out = s.schedule()
    assert len(out.seqs) == 2  # 3 x 4 padded tokens would exceed 8


def test_detokenizer_holds_incomplete_characters():
    def utf8(ids):
        return bytes(ids).decode("utf-8", errors="replace")
    d = Detokenizer(utf8, [ord("a")])
    euro = list("€".encode())
    assert d.step(euro[0]) == "" and d.step(euro[1]) == "" and d.step(euro[2]) == "€"
    assert d.step(ord("b")) == "b"
