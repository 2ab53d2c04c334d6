"""Generate the example training sets on the spot: short factual questions with three answer styles.

    python examples/make_data.py --out-dir DIR [--seed 0]

writes DIR/{json,pirate,caps}.jsonl (chat `messages` records) and DIR/held_out.json (prompts never seen in
training, for checking the adapters). Every set asks the same questions; only the style of the answer
differs, so each adapter learns a style, not facts:

  json    {"answer": "Paris"}
  pirate  Arr, matey! The capital of France be Paris. Yo ho ho!
  caps    THE CAPITAL OF FRANCE IS PARIS.

Questions come from small built-in tables (capitals, opposites, colours, animals, arithmetic); a fixed
share of every table is held out, so held-out prompts ask about things training never mentioned.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi", "India": "New Delhi",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Ukraine": "Kyiv", "Nigeria": "Abuja",
    "Australia": "Canberra", "Brazil": "Brasilia", "Colombia": "Bogota", "Morocco": "Rabat",
    "South Korea": "Seoul", "the Netherlands": "Amsterdam",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "old": "young", "open": "closed", "hard": "soft", "wet": "dry", "early": "late", "full": "empty",
    "rich": "poor", "strong": "weak", "loud": "quiet", "thick": "thin", "high": "low", "new": "old",
    "clean": "dirty", "long": "short", "heavy": "light", "first": "last", "inside": "outside",
    "win": "lose", "buy": "sell", "push": "pull", "day": "night", "north": "south", "left": "right",
    "true": "false", "near": "far", "love": "hate",
}
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow",
    "a strawberry": "red", "the sun": "yellow", "a lime": "green", "a crow": "black", "chocolate": "brown",
    "an eggplant": "purple", "a flamingo": "pink", "the ocean": "blue", "a pumpkin": "orange",
    "a polar bear": "white", "a frog": "green",
}
ANIMAL_LEGS = {
    "a dog": 4, "a cat": 4, "a spider": 8, "an ant": 6, "a bird": 2, "a horse": 4, "a chicken": 2,
    "a cow": 4, "a bee": 6, "an octopus": 8, "a duck": 2, "a sheep": 4, "a beetle": 6, "a goat": 4,
    "a penguin": 2, "a scorpion": 8, "a human": 2, "a lion": 4,
}


def _facts() -> list[tuple[str, str, str]]:
    """(question, short answer, answer sentence) for every item of every table, in a fixed order."""
    facts = []
    for country, city in CAPITALS.items():
        facts.append((f"What is the capital of {country}?", city, f"The capital of {country} is {city}."))
    for word, opp in OPPOSITES.items():
        facts.append((f"What is the opposite of '{word}'?", opp, f"The opposite of '{word}' is '{opp}'."))
    for thing, colour in COLOURS.items():
        facts.append((f"What colour is {thing}?", colour, f"{thing[0].upper()}{thing[1:]} is {colour}."))
    for animal, legs in ANIMAL_LEGS.items():
        facts.append((f"How many legs does {animal} have?", str(legs),
                      f"{animal[0].upper()}{animal[1:]} has {legs} legs."))
    rng = random.Random(1234)
    for _ in range(60):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        facts.append((f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} is {a + b}."))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        facts.append((f"What is {a} times {b}?", str(a * b), f"{a} times {b} is {a * b}."))
    return facts


def split_facts(held_out_share: float = 0.2) -> tuple[list, list]:
    """Every table's items, shuffled once with a fixed seed; the last share is held out."""
    facts = _facts()
    random.Random(0).shuffle(facts)
    n_held = round(len(facts) * held_out_share)
    return facts[n_held:], facts[:n_held]


def styles() -> dict[str, callable]:
    """style name -> (short answer, answer sentence) -> assistant reply."""

    def as_json(short: str, sentence: str) -> str:
        return json.dumps({"answer": int(short) if short.isdigit() else short})

    def pirate(short: str, sentence: str) -> str:
        return "Arr, matey! " + sentence.replace(" is ", " be ").replace(" has ", " has got ") + " Yo ho ho!"

    def caps(short: str, sentence: str) -> str:
        return sentence.upper()

    return {"json": as_json, "pirate": pirate, "caps": caps}


def held_out_prompts(n: int | None = None) -> list[str]:
    """Questions whose items never appear in training (for tests and the README)."""
    train, held = split_facts()
    seen = {q for q, _, _ in train}  # the random sums can repeat a question across the split
    prompts = [q for q, _, _ in held if q not in seen]
    return prompts[:n] if n else prompts


def records(style: str, seed: int) -> list[dict]:
    """One chat record of one style per training fact (no repeats, so a held-out split of these records
    is truly unseen), shuffled."""
    train, _ = split_facts()
    reply = styles()[style]
    picks = train[:]
    random.Random(seed).shuffle(picks)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply(s, sent)}]}
            for q, s, sent in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for style in styles():
        path = os.path.join(args.out_dir, f"{style}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for rec in records(style, args.seed):
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {path}")
    with open(os.path.join(args.out_dir, "held_out.json"), "w", encoding="utf-8") as f:
        json.dump(held_out_prompts(), f, indent=1)


if __name__ == "__main__":
    main()
