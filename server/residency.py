"""Which adapters sit in the model's slots, and whether one of them is merged into the weights.

Slots 1..n of the `AdaptedModel` hold resident adapters keyed by (adapter id, version sha256), so a
request keeps the version it was submitted with while a newer upload of the same id gets its own slot.
An adapter is loaded on the first admitted request that names it. A slot is *pinned* while a running
request uses it; when a new adapter needs a slot, the least recently used unpinned one is evicted. When
every slot is pinned, `acquire` returns None and the request waits in the queue.

Merge policy (DESIGN.md), decided once per step from the running batch:
  * never:  adapters are always applied unmerged.
  * auto:   merge when one adapter has held the whole running batch for `AUTO_MERGE_STABLE_STEPS`
            consecutive steps and some request of it still has at least `AUTO_MERGE_MIN_TOKENS` tokens to
            generate. Merging costs about as much as a few decode steps (one dense ΔW per layer), so it
            only pays for a batch that will run a while; the batch size does not matter (even one row
            saves the whole adapter overhead). The wait filters out the moments when one adapter has the
            batch only by accident — the first of a burst of requests, admitted alone a few milliseconds
            before the rest, or the last request of a draining batch — where a merge would be undone on
            the very next step (bench/serve_load.py, 32 streaming clients on 32 adapters, AMD EPYC 2 cores:
            time to first token p50 3.2× the base model's in the same run with merges on such blips,
            1.2× without). Once merged it stays
            merged while the batch is still that adapter's alone; the step a request of another adapter
            (or of the base model) is admitted, the pristine weights are copied back (bit-exact).
  * always: merge whenever one adapter holds the whole running batch, and schedule so that this is the
            common case: while a batch runs, only requests of the same adapter (or, for a base batch, base
            requests) are admitted. The first waiting request of another adapter blocks the queue until the
            batch drains, then its adapter takes over — first come, first served, runs of one adapter batched.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

from server.sequence import AdapterKey, Sequence

if TYPE_CHECKING:
    from adapters.file import Adapter
    from adapters.runtime import AdaptedModel, SlotImage

AUTO_MERGE_MIN_TOKENS = 32
AUTO_MERGE_STABLE_STEPS = 4


class Residency:
    def __init__(self, model: AdaptedModel, policy: str = "auto", max_resident: int | None = None):
        if policy not in ("never", "auto", "always"):
            raise ValueError(f"unknown merge policy {policy!r}")
        self.model, self.policy = model, policy
        n = model.n_slots - 1 if max_resident is None else min(max_resident, model.n_slots - 1)
        self.free: list[int] = list(range(n, 0, -1))  # pop() gives the lowest slot
        self.slot_of: dict[AdapterKey, int] = {}
        self.pins: Counter[AdapterKey] = Counter()
        self.idle: OrderedDict[AdapterKey, None] = OrderedDict()  # unpinned residents, least recent first
        self.forgotten: set[AdapterKey] = set()  # deleted from the store: unload when the last pin goes
        self.merged: AdapterKey | None = None
        self._alone: tuple[AdapterKey | None, int] = (None, 0)  # (adapter, consecutive steps it had the batch)
        self.loads = self.evictions = self.merges = 0

    # ---- slots ------------------------------------------------------------------------------------
    def acquire(self, key: AdapterKey | None, adapter: Adapter | SlotImage | None) -> int | None:
        """Pin `key` for one request and return its slot, loading it first if needed (0 for the base
        model; a prepared SlotImage loads with one row copy). None when no slot can be freed: every slot is
        pinned."""
        if key is None:
            return 0
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            try:
                self.model.load(slot, adapter)
            except BaseException:
                self._give_back(slot)  # the slot stays usable; the request that named the adapter fails
                raise
            self.slot_of[key] = slot
            self.loads += 1
        self.pins[key] += 1
        self.idle.pop(key, None)
        return slot

    def release(self, key: AdapterKey | None) -> None:
        if key is None:
            return
        self.pins[key] -= 1
        if self.pins[key] > 0:
            return
        del self.pins[key]
        if key in self.forgotten:
            self._give_back(self._unload(key))
        else:
            self.idle[key] = None  # most recently used

    def forget(self, adapter_id: str) -> None:
        """Drop resident versions of a deleted adapter; pinned ones go when their last request ends."""
        for key in [k for k in self.slot_of if k[0] == adapter_id]:
            if key in self.pins:
                self.forgotten.add(key)
            else:
                self._give_back(self._unload(key))

    def resident(self) -> list[AdapterKey]:
        return list(self.slot_of)

    def _free_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        if not self.idle:
            return None
        self.evictions += 1
        return self._unload(next(iter(self.idle)))  # least recently used

    def _unload(self, key: AdapterKey) -> int:
        """Empty the slot of `key` and return it (the caller reuses or frees it)."""
        if self.merged == key:
            self.apply_merge(None)
        slot = self.slot_of.pop(key)
        self.idle.pop(key, None)
        self.model.unload(slot)
        self.forgotten.discard(key)
        return slot

    def _give_back(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort(reverse=True)

    # ---- merge policy -----------------------------------------------------------------------------
    def admits(self, key: AdapterKey | None, group: list[AdapterKey | None]) -> bool:
        """May a request of `key` join a running batch whose rows use `group`?"""
        return self.policy != "always" or not group or all(k == key for k in group)

    def merge_target(self, running: list[Sequence]) -> AdapterKey | None:
        """The adapter to merge for the next step, or None to run unmerged."""
        if self.policy == "never":
            return None
        if not running:
            return self.merged  # nothing runs: leave the weights as they are
        keys = {s.adapter_key for s in running}
        key = next(iter(keys)) if len(keys) == 1 else None
        self._alone = (key, self._alone[1] + 1 if key is not None and key == self._alone[0] else 1)
        if key is None or self.policy == "always" or self.merged == key:
            return key
        if self._alone[1] < AUTO_MERGE_STABLE_STEPS:
            return None
        return key if max(s.remaining for s in running) >= AUTO_MERGE_MIN_TOKENS else None

    def apply_merge(self, key: AdapterKey | None) -> None:
        """Bring the weights to the state `key` asks for (merge, unmerge, or nothing)."""
        if key == self.merged:
            return
        if key is None:
            self.model.unmerge()
        else:
            self.model.merge(self.model.resident[self.slot_of[key]])
            self.merges += 1
        self.merged = key
