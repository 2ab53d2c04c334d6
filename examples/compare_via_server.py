"""Ask a running svdserve the held-out prompts with the base model and with each example adapter.

    python examples/compare_via_server.py [--url http://127.0.0.1:8000] [--max-tokens 40]

Uploads examples/{json,pirate,caps}.safetensors (PUT /adapters/<name>), then sends each prompt once to the
base model and once per adapter through /v1/chat/completions (greedy), all concurrently — the server batches
them together — and prints a markdown table (the one in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTERS = ("json", "pirate", "caps")
PROMPTS = ("What is the capital of Thailand?", "What is the opposite of 'left'?",
           "How many legs does a penguin have?")


async def ask(client: httpx.AsyncClient, prompt: str, adapter: str | None, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    if adapter:
        body["adapter_id"] = adapter
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"].strip().replace("\n", " ").replace("|", "\\|")


async def main(url: str, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for name in ADAPTERS:
            with open(os.path.join(HERE, f"{name}.safetensors"), "rb") as f:
                (await client.put(f"/adapters/{name}", content=f.read())).raise_for_status()
        columns = (None, *ADAPTERS)
        answers = await asyncio.gather(*(ask(client, p, a, max_tokens) for p in PROMPTS for a in columns))
    print("| prompt | base | " + " | ".join(ADAPTERS) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, prompt in enumerate(PROMPTS):
        row = answers[i * len(columns):(i + 1) * len(columns)]
        print(f"| {prompt} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--max-tokens", type=int, default=40)
    args = ap.parse_args()
    asyncio.run(main(args.url, args.max_tokens))
