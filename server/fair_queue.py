"""Waiting requests, admitted in weighted round-robin across tenants and first come, first served within one.

Invariants: every tenant with waiting requests is in the rotation exactly once; `peek()` is always what
`popleft()` takes next; a tenant of weight w is served up to w times in a row before the turn passes on (its
weight is read when its turn starts); a tenant whose queue empties leaves the rotation, and one that arrives
joins at its end. So while A has 200 requests waiting and B sends one, B is at most one turn of A away.
Plain Python, no torch; not thread-safe (the scheduler's caller holds the lock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from server.sequence import Sequence


class FairQueue:
    def __init__(self, weight: Callable[[str], int] | None = None):
        self.weight = weight or (lambda tenant: 1)
        self._queues: dict[str, deque[Sequence]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting requests; the head has the turn
        self._served = 0  # admissions the head tenant has had in its current turn
        self._turn = 1  # the head tenant's weight, read at the first admission of its turn
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence: tenants in rotation order, first come first within each."""
        for tenant in list(self._turns):
            yield from list(self._queues[tenant])

    def append(self, seq: Sequence) -> None:
        q = self._queues.get(seq.tenant)
        if q is None:
            q = self._queues[seq.tenant] = deque()
            self._turns.append(seq.tenant)
        q.append(seq)
        self._len += 1

    def peek(self) -> Sequence:
        """The sequence admission takes next. Raises IndexError when empty."""
        if not self._turns:
            raise IndexError("peek from an empty FairQueue")
        return self._queues[self._turns[0]][0]

    def popleft(self) -> Sequence:
        """Take `peek()` and move the rotation on when the tenant's turn is used up."""
        tenant = self._turns[0] if self._turns else None
        if tenant is None:
            raise IndexError("pop from an empty FairQueue")
        if self._served == 0:
            self._turn = max(1, self.weight(tenant))
        seq = self._queues[tenant].popleft()
        self._len -= 1
        self._served += 1
        if not self._queues[tenant]:
            self._drop(tenant)
        elif self._served >= self._turn:
            self._turns.rotate(-1)
            self._served = 0
        return seq

    def remove(self, seq: Sequence) -> None:
        """Take a waiting sequence out (an abort). Raises ValueError when it is not waiting."""
        q = self._queues.get(seq.tenant)
        if q is None:
            raise ValueError("sequence is not waiting")
        q.remove(seq)
        self._len -= 1
        if not q:
            self._drop(seq.tenant)

    def count(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def tenants(self) -> list[str]:
        return list(self._turns)

    def _drop(self, tenant: str) -> None:
        if self._turns and self._turns[0] == tenant:
            self._served = 0
        self._turns.remove(tenant)
        del self._queues[tenant]
