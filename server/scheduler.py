"""The scheduler: who runs in the next step with which tokens, and what a step's results mean. Plain Python,
no torch.

One step mixes decode tokens and prompt chunks under a token budget (`max_num_batched_tokens`): every
running sequence gets its tokens first (one for a decoding sequence; the next chunk of a prompt being
prefilled), oldest first, then waiting sequences are admitted with their first chunk while budget, batch
size, adapter slots and KV blocks allow. A long prompt is prefilled over several steps, so it never stops
the other streams for longer than one chunk (chunked prefill, as vLLM v1 schedules it).

KV memory is a pool of blocks (server.kv.BlockManager). A sequence gets blocks as its tokens need them; at
admission the longest run of its prompt's full blocks already in the prefix cache (same tokens, same
adapter version, same salt) is referenced instead of computed. When a running sequence needs a block and
the pool is empty, the youngest running sequence is preempted: its blocks go back to the pool and it waits
at the head of the queue to be recomputed (its tokens so far are kept, so it continues where it was). A
request never fails for lack of blocks.

Admission takes turns across tenants (weighted round-robin, `FairQueue`) and is first come, first served
within a tenant; preempted sequences come before both. It never overtakes: a request that cannot start
(batch full, no budget, every adapter slot pinned, no blocks) waits at the head, and so does everything
behind it.

Thread-safety is the caller's: the engine calls every method under one lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.fair_queue import FairQueue
from server.kv.blocks import BlockManager
from server.kv.hashing import chain
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

    seqs: list[Sequence]  # sequences with tokens this step: running ones (oldest first), then admitted ones
    token_ids: list[list[int]]  # each one's input tokens: [last sampled token] (decode) or a prompt chunk
    positions: list[int]  # position of each one's first input token (= its tokens already in the cache)
    block_tables: list[list[int]]  # each one's KV blocks, covering positions[i] + len(token_ids[i]) tokens
    sample: list[bool]  # the step reaches each one's last token: a token is sampled (else a prompt chunk)
    slots: list[int]  # adapter slot of each sequence (0 = base model)
    merged: AdapterKey | None  # adapter whose weights must be merged for this step (None = unmerged)
    zero_blocks: list[int] = field(default_factory=list)  # blocks to zero first (fresh, or left by a failed row)
    finished_ids: list[str] = field(default_factory=list)  # requests that left since the last step
    aborted: list[Sequence] = field(default_factory=list)  # aborted or failed to start since the last step (to report)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to wait for blocks in this schedule

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def prefill(self) -> bool:
        """Some sequence computes more than one token this step (a prompt chunk)."""
        return any(len(t) > 1 for t in self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_model_len: int, max_queue: int, eos_ids: set[int],
                 slots: AdapterSlots, kv: BlockManager | None = None, max_num_batched_tokens: int = 4096,
                 weight: Callable[[str], int] | None = None):
        """`kv` defaults to a pool that holds max_batch_size full-length sequences (block size 16)."""
        if max_num_batched_tokens < max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_batch_size "
                             f"({max_batch_size}): every running sequence decodes one token per step")
        self.max_batch_size, self.max_model_len, self.max_queue = max_batch_size, max_model_len, max_queue
        self.eos_ids, self.slots = frozenset(eos_ids), slots
        self.kv = kv or BlockManager(max_batch_size * -(-max_model_len // 16) + 1, 16)
        self.max_num_batched_tokens = max_num_batched_tokens  # tokens (decode + prompt chunks) per step
        self.waiting = FairQueue(weight)  # weight(tenant): its share of admissions (default 1)
        self.preempted: list[Sequence] = []  # preempted sequences, oldest first: admitted before `waiting`
        self.running: list[Sequence] = []  # oldest first (by arrival)
        self.preemptions = 0
        self._arrivals = 0
        self._abort_ids: set[str] = set()
        self._finished_ids: list[str] = []
        self._failed: list[Sequence] = []  # failed at admission since the last step (to report)

    # ---- requests in and out ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
        self._arrivals += 1
        seq.arrival = self._arrivals
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Applied at the start of the next `schedule()` (never while a step is running)."""
        self._abort_ids.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.preempted or self.running or self._abort_ids or self._finished_ids
                    or self._failed)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.preempted)

    def drop_adapter(self, name: str) -> int:
        """Forget the cached blocks of adapter `name` (deleted); returns how many."""
        return self.kv.drop(name)

    # ---- schedule ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        aborted = self._apply_aborts()
        budget = self.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):  # decode tokens first (budget >= batch size: they always fit)
            if seq.status is Status.RUNNING and seq.num_tokens - seq.num_computed == 1 and self._grow(seq, preempted):
                plan.append((seq, 1))
                budget -= 1
        for seq in list(self.running):  # then the next chunk of each prompt being prefilled, oldest first
            if seq.status is Status.RUNNING and seq.num_tokens - seq.num_computed > 1:
                n = self._chunk(seq, min(seq.num_tokens - seq.num_computed, budget), plan, preempted)
                if n:
                    plan.append((seq, n))
                    budget -= n  # every chunk token is one row of the step's forward
        if not preempted:  # blocks are short: let the running ones finish before anyone new starts
            plan += self._admit(budget)
        return self._output(plan, aborted, preempted)

    def _grow(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        """A block for the next decode token of `seq` when it needs one, preempting the youngest while the
        pool is empty (the youngest is never planned yet: decodes are planned oldest first). False when
        `seq` itself was preempted."""
        need = self.kv.blocks_for(seq.num_computed + 1) - len(seq.blocks)
        while not self.kv.can_take([], need):
            victim = self.running[-1]
            self._preempt(victim, preempted)
            if victim is seq:
                return False
        seq.blocks += self.kv.take([], need)
        return True

    def _chunk(self, seq: Sequence, most: int, plan: list, preempted: list[Sequence]) -> int:
        """Blocks for the next prompt chunk of a running sequence: as many tokens as budget and free blocks
        allow (at most `most`). With no free block and nothing else to run, the youngest sequence makes room (so two long
        prompts half prefilled cannot hold the pool between them forever)."""
        bs = self.kv.block_size
        if most <= 0:
            return 0
        room = (len(seq.blocks) + self.kv.num_free) * bs - seq.num_computed
        while room <= 0 and not plan:
            victim = self.running[-1]
            self._preempt(victim, preempted)
            if victim is seq:
                return 0
            room = (len(seq.blocks) + self.kv.num_free) * bs - seq.num_computed
        n = min(most, room)
        if n > 0:
            seq.blocks += self.kv.take([], self.kv.blocks_for(seq.num_computed + n) - len(seq.blocks))
        return max(n, 0)

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        """Start waiting sequences with their first chunk; `budget`: the tokens left after the decode tokens
        and the running prompts' chunks."""
        plan, bs = [], self.kv.block_size
        while len(self.running) < self.max_batch_size and (self.preempted or self.waiting):
            seq = self.preempted[0] if self.preempted else self.waiting.peek()
            if not self.slots.admits(seq.adapter_key, [s.adapter_key for s in self.running]):
                break
            hits = self._hits(seq)
            room = (self.kv.num_free - sum(1 for b in hits if b in self.kv.free)) * bs
            n = min(seq.num_tokens - len(hits) * bs, budget, room)
            if n <= 0:
                break
            try:
                slot = self.slots.acquire(seq.adapter_key, seq.adapter)
            except Exception as exc:  # its adapter cannot be loaded: this request fails, the queue goes on
                self._pop(seq)
                seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", f"loading its adapter failed: {exc}"
                self._failed.append(seq)
                continue
            if slot is None:
                break  # every slot is pinned by a running request: wait, do not fail
            self._pop(seq)
            self._start(seq, slot, hits, n)
            plan.append((seq, n))
            budget -= n
        self.running.sort(key=lambda s: s.arrival)
        return plan

    def _start(self, seq: Sequence, slot: int, hits: list[int], n: int) -> None:
        bs = self.kv.block_size
        seq.blocks = self.kv.take(hits, self.kv.blocks_for(len(hits) * bs + n) - len(hits))
        seq.num_computed, seq.published = len(hits) * bs, len(hits)
        if seq.cached_tokens < 0:  # its first admission (not a recompute after preemption)
            seq.cached_tokens = min(seq.num_computed, len(seq.prompt_ids))
            self.kv.query_tokens += len(seq.prompt_ids)
            self.kv.hit_tokens += seq.cached_tokens
        seq.status, seq.slot = Status.RUNNING, slot
        self.running.append(seq)

    def _hits(self, seq: Sequence) -> list[int]:
        """Cached blocks of its tokens' longest known prefix. At least its last token is always computed (it
        gives the logits), and never written into a shared block. A request asking for prompt logprobs
        computes its whole prompt (they come from the prompt's hidden states)."""
        if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None:
            return []
        limit = (seq.num_tokens - 1) // self.kv.block_size
        return self.kv.hits(chain(seq.kv_root, seq.all_ids, self.kv.block_size, seq.hashes), limit)

    def _pop(self, seq: Sequence) -> None:
        if self.preempted and self.preempted[0] is seq:
            self.preempted.pop(0)
        else:
            self.waiting.popleft()

    def _output(self, plan: list[tuple[Sequence, int]], aborted: list[Sequence],
                preempted: list[Sequence]) -> SchedulerOutput:
        seqs = [s for s, _ in plan]
        out = SchedulerOutput(
            seqs=seqs, token_ids=[_inputs(s, n) for s, n in plan], positions=[s.num_computed for s in seqs],
            block_tables=[list(s.blocks) for s in seqs],
            sample=[s.num_computed + n == s.num_tokens for s, n in plan], slots=[s.slot for s in seqs],
            merged=self.slots.merge_target(self.running), zero_blocks=self.kv.take_to_zero(),
            finished_ids=self._finished_ids, aborted=aborted + self._failed, preempted=preempted)
        self._finished_ids, self._failed = [], []
        return out

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        """Back to wait for blocks, keeping its tokens: it is recomputed (prompt + output) when readmitted."""
        self.running.remove(seq)
        self.kv.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, Status.WAITING
        self.slots.release(seq.adapter_key)
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: s.arrival)
        preempted.append(seq)
        self.preemptions += 1

    def _apply_aborts(self) -> list[Sequence]:
        if not self._abort_ids:
            return []
        ids, self._abort_ids = self._abort_ids, set()
        aborted = [s for s in self.waiting if s.request_id in ids]
        for s in aborted:
            self.waiting.remove(s)
        parked = [s for s in self.preempted if s.request_id in ids]
        self.preempted = [s for s in self.preempted if s.request_id not in ids]
        for s in aborted + parked:
            s.status, s.finish_reason = Status.FINISHED, "abort"
        running = [s for s in self.running if s.request_id in ids]
        for s in running:
            self._finish(s, "abort")
        self._drop_finished()
        return aborted + parked + running

    # ---- update -----------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, results: list[SampledToken | None]) -> list[Sequence]:
        """Advance each sequence by its tokens of the step, register its newly full blocks in the prefix
        cache, append its sampled token (None: a prompt chunk, nothing sampled), finish the ones that are
        done and free their blocks and adapter pins. Returns the sequences with news (incl. `out.aborted`)."""
        changed = list(out.aborted)
        for seq, ids, res in zip(out.seqs, out.token_ids, results, strict=True):
            if seq.status is not Status.RUNNING:
                continue
            seq.num_computed += len(ids)
            if res is None:
                self._publish(seq)
                continue
            if res.error is not None:  # this row failed inside the step: it ends alone, its K/V discarded
                seq.error = res.error
                self._finish(seq, "error", poisoned=True)
                changed.append(seq)
                continue
            self._publish(seq)
            self._take(seq, res)
            changed.append(seq)
        self._drop_finished()
        return changed

    def _take(self, seq: Sequence, res: SampledToken) -> None:
        if res.prompt is not None:
            seq.prompt_logprobs = res.prompt
        if seq.params.max_tokens == 0:  # echo with max_tokens 0: the prompt's logprobs only, no token
            self._finish(seq, "length")
            return
        before = len(seq.text)
        is_eos = (res.token_id in self.eos_ids and not seq.params.ignore_eos
                  or res.token_id in seq.params.stop_token_ids)
        seq.append(res, is_eos)
        reason = self._finish_reason(seq, is_eos, len(seq.text) - before)
        if reason is not None:
            self._finish(seq, reason)

    def _publish(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V this step completed."""
        full = seq.num_computed // self.kv.block_size
        if full <= seq.published:
            return
        hashes = chain(seq.kv_root, seq.all_ids, self.kv.block_size, seq.hashes)
        for i in range(seq.published, full):
            self.kv.publish(seq.blocks[i], hashes[i], seq.kv_owner)
        seq.published = full

    def _finish_reason(self, seq: Sequence, is_eos: bool, new_chars: int) -> str | None:
        if is_eos or seq.find_stop(new_chars):
            return "stop"
        if seq.remaining <= 0 or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, poisoned: bool = False) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.kv.release(seq.blocks, poisoned)
        seq.blocks = []
        self.slots.release(seq.adapter_key)
        self._finished_ids.append(seq.request_id)

    def _drop_finished(self) -> None:
        self.running = [s for s in self.running if s.status is Status.RUNNING]


def _inputs(seq: Sequence, n: int) -> list[int]:
    """The next n tokens of `seq` to compute (a decode step's is its last sampled token)."""
    if n == 1 and seq.num_computed == seq.num_tokens - 1:
        return [seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]]
    return seq.all_ids[seq.num_computed:seq.num_computed + n]

