"""The start-up heap is frozen out of the garbage collector's walks while the app serves, and given back at
shutdown (server/heap.py)."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel
from server.app import create_app
from server.config import Settings, build_config
from server.heap import freeze_startup_heap, thaw_heap
from tests.conftest import tiny_chat_model


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector could free it


def _tracked(obj, generation: int) -> bool:
    return any(o is obj for o in gc.get_objects(generation=generation))


def test_freeze_takes_live_objects_out_of_collections_and_thaw_gives_them_back():
    live = Node()
    try:
        assert freeze_startup_heap() > 0 and gc.get_freeze_count() > 0
        assert not any(_tracked(live, g) for g in range(3))  # no collection walks it now
        gc.collect()
        assert live.me is live
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0 and _tracked(live, 2)


def test_the_app_freezes_its_start_up_heap_while_it_serves(tmp_path):
    base = tiny_chat_model()
    model = AdaptedModel(base, compute_factors(base.targets, 16, progress=False), n_slots=3)
    config = build_config(Settings(store=str(tmp_path / "store"), max_rank=16, device="cpu", dtype="float32",
                                   max_resident_adapters=2, max_model_len=64))
    before = Node()
    with TestClient(create_app(config, model=model)) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() > 0 and not _tracked(before, 2)
    assert gc.get_freeze_count() == 0 and _tracked(before, 2)
