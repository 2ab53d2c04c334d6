"""Measure the example adapters on held-out prompts: the share of answers in each adapter's style.

    python examples/evaluate.py [--n 20] [--max-new-tokens 32] [--show 3]

Loads the default model once, the three example adapters into slots 1-3, and greedy-decodes the same
held-out prompts (questions about items no training example mentioned) with no adapter and with each
adapter. Prints, for each adapter, the share of answers in its style for the base model and for the
adapter, then the first `--show` answers side by side. tests/test_examples.py runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTERS = ("json", "pirate", "caps")


def is_json_answer(text: str) -> bool:
    """The whole answer is a JSON object with an "answer" key."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and "answer" in value


def is_pirate(text: str) -> bool:
    return text.strip().startswith("Arr")


def is_caps(text: str) -> bool:
    """At least 5 letters and at most 10% of them lower case."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 5 and sum(c.islower() for c in letters) <= 0.1 * len(letters)


CHECKS = {"json": is_json_answer, "pirate": is_pirate, "caps": is_caps}
DESCRIBE = {"json": 'the answer is a JSON object with an "answer" key', "pirate": 'the answer starts with "Arr"',
            "caps": "the answer is in capitals (at most 10% lower-case letters)"}


def adapter_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.safetensors")


@torch.no_grad()
def greedy(adapted, tokenizer, prompts: list[str], slot: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to single-turn chat prompts, all rows using adapter `slot` (0 = base model)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # left padding: generation appends
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(adapted.device)
    finally:
        tokenizer.padding_side = side
    with adapted.use(adapted.batch([slot] * len(prompts))):
        out = adapted.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def load(cache_dir: str | None = None):
    """The default model with the example adapters in slots 1.. (in the order of ADAPTERS)."""
    from adapters.factors import default_cache_dir
    from adapters.file import read_adapter
    from adapters.runtime import load_adapted_model

    adapted = load_adapted_model(None, r_max=64, cache_dir=cache_dir or default_cache_dir(),
                                 n_slots=len(ADAPTERS) + 1, progress=False)
    for slot, name in enumerate(ADAPTERS, 1):
        adapted.load(slot, read_adapter(adapter_path(name), adapted.spec))
    return adapted


def answers(adapted, prompts: list[str], max_new_tokens: int) -> dict[str, list[str]]:
    """'base' and every adapter name -> its answers to `prompts`."""
    tok = adapted.base.tokenizer
    out = {"base": greedy(adapted, tok, prompts, 0, max_new_tokens)}
    for slot, name in enumerate(ADAPTERS, 1):
        out[name] = greedy(adapted, tok, prompts, slot, max_new_tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--show", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from make_data import held_out_prompts

    prompts = held_out_prompts(args.n)
    got = answers(load(args.cache_dir), prompts, args.max_new_tokens)
    print("| adapter | check | base | adapter |\n|---|---|---|---|")
    for name in ADAPTERS:
        check = CHECKS[name]
        base = sum(map(check, got["base"])) / len(prompts)
        mine = sum(map(check, got[name])) / len(prompts)
        print(f"| {name} | {DESCRIBE[name]} | {base:.0%} | {mine:.0%} |")
    for i, prompt in enumerate(prompts[: args.show]):
        print(f"\n### {prompt}")
        for who, texts in got.items():
            print(f"- {who}: {texts[i]!r}")


if __name__ == "__main__":
    main()
