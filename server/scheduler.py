"""The scheduler: who runs in the next step, and what a step's results mean. Plain Python, no torch.

Each step is either a *prefill* of newly admitted sequences or a *decode* of every running sequence
(new requests are admitted as soon as there is room, then decode resumes; vLLM v0's policy). Admission takes
turns across tenants (weighted round-robin, `FairQueue`) and is first come, first served within a tenant, so
one tenant flooding the queue cannot starve another. It never overtakes: a request that cannot start (batch
full, or every adapter slot pinned by running requests) waits at the head, and so does everything behind it.

KV-cache rows are kept dense: the running sequences occupy rows 0..n-1, so a decode step attends over one
contiguous slice of the cache. When sequences finish, survivors from the top rows move into the holes; the
moves are handed to the runner in the next `SchedulerOutput` (it copies the cached K/V before the forward).

Thread-safety is the caller's: the engine calls every method under one lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.fair_queue import FairQueue
from server.sequence import AdapterKey, SampledToken, Sequence, Status


class QueueFull(Exception):
    """Too many waiting requests (HTTP 429)."""


class AdapterSlots(Protocol):
    """Adapter residency as the scheduler sees it (implemented by server.residency.Residency)."""

    def acquire(self, key: AdapterKey | None, adapter: object | None) -> int | None: ...
    def release(self, key: AdapterKey | None) -> None: ...
    def admits(self, key: AdapterKey | None, group: list[AdapterKey | None]) -> bool: ...
    def merge_target(self, running: list[Sequence]) -> AdapterKey | None: ...


@dataclass
class SchedulerOutput:
    """Everything the model runner needs for one step."""

    prefill: bool  # True: `seqs` are new sequences to prefill; False: decode one token for each
    seqs: list[Sequence]  # sequences to run this step, in cache-row order
    rows: list[int]  # cache row of each of `seqs` (prefill: contiguous new rows; decode: 0..n-1)
    token_ids: list[list[int]]  # prefill: each prompt; decode: [last sampled token] per sequence
    positions: list[int]  # position of each sequence's first input token (prefill: 0; decode: num_cached)
    slots: list[int]  # adapter slot of each sequence (0 = base model)
    merged: AdapterKey | None  # adapter whose weights must be merged for this step (None = unmerged)
    clear_rows: list[int] = field(default_factory=list)  # rows to zero before the moves (left by failed rows)
    cache_moves: list[tuple[int, int, int]] = field(default_factory=list)  # (src row, dst row, n tokens)
    finished_ids: list[str] = field(default_factory=list)  # requests that left since the last step
    aborted: list[Sequence] = field(default_factory=list)  # aborted or failed to start since the last step (to report)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_model_len: int, max_queue: int, eos_ids: set[int],
                 slots: AdapterSlots, max_prefill_tokens: int = 4096,
                 weight: Callable[[str], int] | None = None):
        self.max_batch_size, self.max_model_len, self.max_queue = max_batch_size, max_model_len, max_queue
        self.eos_ids, self.slots = frozenset(eos_ids), slots
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens per prefill step
        self.waiting = FairQueue(weight)  # weight(tenant): its share of admissions (default 1)
        self.running: list[Sequence] = []  # running[i].row == i
        self._abort_ids: set[str] = set()
        self._moves: list[tuple[int, int, int]] = []
        self._finished_ids: list[str] = []
        self._failed: list[Sequence] = []  # failed at admission since the last step (to report)
        self._clear: list[int] = []  # cache rows of sequences that failed in a step (their K/V may be NaN)

    # ---- requests in and out ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Applied at the start of the next `schedule()` (never while a step is running)."""
        self._abort_ids.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._abort_ids or self._finished_ids or self._failed)

    # ---- schedule ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        aborted = self._apply_aborts()
        new = self._admit()
        seqs = new or list(self.running)
        out = SchedulerOutput(
            prefill=bool(new), seqs=seqs, rows=[s.row for s in seqs],
            token_ids=[s.prompt_ids for s in seqs] if new else [[s.output_ids[-1]] for s in seqs],
            positions=[0] * len(seqs) if new else [s.num_cached for s in seqs],
            slots=[s.slot for s in seqs], merged=self.slots.merge_target(self.running),
            clear_rows=self._clear, cache_moves=self._moves, finished_ids=self._finished_ids,
            aborted=aborted + self._failed)
        self._moves, self._finished_ids, self._failed, self._clear = [], [], [], []
        return out

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.peek()
            longest = max([len(seq.prompt_ids)] + [len(s.prompt_ids) for s in new])
            if new and longest * (len(new) + 1) > self.max_prefill_tokens:
                break
            if not self.slots.admits(seq.adapter_key, [s.adapter_key for s in self.running]):
                break
            try:
                slot = self.slots.acquire(seq.adapter_key, seq.adapter)
            except Exception as exc:  # its adapter cannot be loaded: this request fails, the queue goes on
                self.waiting.popleft()
                seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", f"loading its adapter failed: {exc}"
                self._failed.append(seq)
                continue
            if slot is None:
                break  # every slot is pinned by a running request: wait, do not fail
            self.waiting.popleft()
            seq.status, seq.slot, seq.row = Status.RUNNING, slot, len(self.running)
            self.running.append(seq)
            new.append(seq)
        return new

    def _apply_aborts(self) -> list[Sequence]:
        if not self._abort_ids:
            return []
        ids, self._abort_ids = self._abort_ids, set()
        aborted = [s for s in self.waiting if s.request_id in ids]
        for s in aborted:
            self.waiting.remove(s)
            s.status, s.finish_reason = Status.FINISHED, "abort"
        running = [s for s in self.running if s.request_id in ids]
        for s in running:
            self._finish(s, "abort")
        self._compact()
        return aborted + running

    # ---- update -----------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, results: list[SampledToken]) -> list[Sequence]:
        """Append each sequence's sampled token, finish the ones that are done, free their rows and
        adapter pins. Returns the sequences with news (including `out.aborted`)."""
        changed = list(out.aborted)
        for seq, res in zip(out.seqs, results, strict=True):
            if seq.status is not Status.RUNNING:
                continue
            if res.prompt is not None:
                seq.prompt_logprobs = res.prompt
            if seq.params.max_tokens == 0:  # echo with max_tokens 0: the prompt's logprobs only, no token
                self._finish(seq, "length")
                changed.append(seq)
                continue
            if res.error is not None:  # this row failed inside the step: it ends alone
                seq.error = res.error
                self._clear.append(seq.row)
                self._finish(seq, "error")
                changed.append(seq)
                continue
            before = len(seq.text)
            is_eos = (res.token_id in self.eos_ids and not seq.params.ignore_eos
                      or res.token_id in seq.params.stop_token_ids)
            seq.append(res, is_eos)
            reason = self._finish_reason(seq, is_eos, len(seq.text) - before)
            if reason is not None:
                self._finish(seq, reason)
            changed.append(seq)
        self._compact()
        return changed

    def _finish_reason(self, seq: Sequence, is_eos: bool, new_chars: int) -> str | None:
        if is_eos or seq.find_stop(new_chars):
            return "stop"
        if seq.remaining <= 0 or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.slots.release(seq.adapter_key)
        self._finished_ids.append(seq.request_id)

    def _compact(self) -> None:
        """Drop finished sequences; move survivors from rows >= n into the holes below n."""
        alive = [s for s in self.running if s.status is Status.RUNNING]
        if len(alive) == len(self.running):
            return
        n = len(alive)
        holes = iter(sorted(set(range(n)) - {s.row for s in alive}))
        for seq in alive:
            if seq.row >= n:
                dst = next(holes)
                self._moves.append((seq.row, dst, seq.num_cached))
                seq.row = dst
        self.running = sorted(alive, key=lambda s: s.row)
