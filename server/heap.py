"""The serving process's Python heap and its garbage collector.

A full (generation 2) collection walks every object the collector tracks, holding the GIL throughout, so the
engine thread — and with it every running stream — waits until it ends. A served process holds the base
model's ~400,000 tracked objects (modules, parameters, tokenizer tables) plus about 1,000 per parsed adapter in
the store's cache; measured on the 2-core host, full collections took 0.2–0.5 s each and came again and again
while cold adapters were parsed (each parse leaves long-lived objects behind, and Python collects in full once
those grow by a quarter): the streams' inter-token latency p99 rose from 0.2 to 0.65 s (bench/adapter_ops.py,
cold loads under load).

What start-up loads lives as long as the process, so collecting it is wasted work: `freeze_startup_heap`
collects once and moves every surviving object to the permanent generation (`gc.freeze`), which collections
skip. Frozen objects are still freed by reference counting; only reference cycles among them would outlive
their use, and start-up objects are never dropped anyway. `thaw_heap` at shutdown gives them back to the
collector (a process that builds several apps, as the tests do, does not keep the earlier ones' cycles).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze everything alive now (call once the model, store and engine are built); returns
    how many objects were frozen."""
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's walks (%.2f s)", frozen,
             time.monotonic() - started)
    return frozen


def thaw_heap() -> None:
    """Undo `freeze_startup_heap` (at shutdown): frozen objects become collectable again."""
    gc.unfreeze()
