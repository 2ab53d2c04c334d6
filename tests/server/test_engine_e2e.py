"""The engine on the real default model (SmolLM2-135M-Instruct): an OSoRA adapter changes greedy output,
and merged serving gives the same tokens as unmerged serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.runtime import load_adapted_model
from adapters.synthetic import random_adapter

from .engine_helpers import make_engine, request, run_all, tokens

FACTOR_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "factors"


@pytest.fixture(scope="module")
def real():
    adapted = load_adapted_model(None, r_max=64, cache_dir=str(FACTOR_CACHE), n_slots=4, progress=False)
    return adapted, adapted.base.tokenizer


@pytest.mark.e2e
def test_osora_changes_output_and_merged_equals_unmerged(real, tmp_path):
    from server.engine import SamplingParams

    adapted, tok = real
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    params = SamplingParams(max_tokens=40, temperature=0)
    adapter = random_adapter("osora", adapted.spec, adapted.factors, rank=16, seed=0, strength=0.3)
    results = {}
    for policy in ("never", "always"):
        eng, store = make_engine(adapted, tok, tmp_path / policy, merge_policy=policy, max_model_len=256,
                                 max_batch_size=4)
        store.put("o", adapter.to_bytes())
        try:
            base, adapted_out = run_all(eng, [request(0, ids, None, params), request(1, ids, "o", params)])
            # under `always` the two requests run one after the other, the adapter one merged
            results[policy] = (tokens(base), tokens(adapted_out), eng.stats()["merges_total"])
        finally:
            eng.shutdown()
    (base_n, osora_n, merges_n), (base_a, osora_a, merges_a) = results["never"], results["always"]
    assert merges_n == 0 and merges_a >= 1
    assert base_n == base_a
    assert osora_n != base_n
    assert osora_n == osora_a
    assert tok.decode(base_n).strip()
