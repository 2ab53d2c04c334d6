"""Label values with bounded cardinality: the first `limit` distinct values keep their own label, every later one
shares OTHER — a fleet with thousands of tenants still exports a bounded number of series."""

from __future__ import annotations

import threading

OTHER = "_other"


class BoundedLabels:
    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER
