"""The shipped example adapters, measured on held-out prompts with the real default model.

Each adapter must put most of its greedy answers in its style while the base model puts almost none there:
a JSON object with an "answer" key, a reply starting with "Arr", an all-capitals reply. The prompts ask
about items (countries, words, animals, sums) that no training example mentioned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FACTOR_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "factors"
sys.path.insert(0, str(EXAMPLES))

import evaluate  # noqa: E402  (examples/evaluate.py)
from make_data import held_out_prompts  # noqa: E402

N_PROMPTS = 16


@pytest.fixture(scope="module")
def got():
    adapted = evaluate.load(str(FACTOR_CACHE))
    return evaluate.answers(adapted, held_out_prompts(N_PROMPTS), max_new_tokens=24)


def share(check, texts: list[str]) -> float:
    return sum(map(check, texts)) / len(texts)


@pytest.mark.e2e
@pytest.mark.parametrize("name, at_least", [("json", 0.8), ("pirate", 0.8), ("caps", 0.7)])
def test_example_adapter_answers_in_its_style(got, name, at_least):
    check = evaluate.CHECKS[name]
    base, adapted = share(check, got["base"]), share(check, got[name])
    assert base <= 0.1, f"the base model already answers in the {name} style: {got['base']}"
    assert adapted >= at_least, f"{name} adapter: only {adapted:.0%} in style: {got[name]}"


@pytest.mark.e2e
def test_example_adapters_keep_the_other_styles_apart(got):
    # an adapter teaches its own style, not the others': the pirate adapter does not answer in JSON, etc.
    for name in evaluate.ADAPTERS:
        for other in evaluate.ADAPTERS:
            if other != name:
                assert share(evaluate.CHECKS[other], got[name]) <= 0.2, (name, other, got[name])
