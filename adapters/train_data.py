"""Training data: JSONL records tokenized into (input_ids, labels) with the loss on the answer only.

Each line is one JSON object, either
  {"prompt": "...", "completion": "..."}   raw text; the completion is followed by the EOS token, or
  {"messages": [{"role": ..., "content": ...}, ...]}   rendered with the model's chat template; the loss
                                                          covers the assistant turns only.
Chat turns are tokenized piece by piece — the prompt up to each assistant turn exactly as the server
renders it (`add_generation_prompt=True`), then the turn itself — so the model is trained on the token
sequences it will see when served.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training file that cannot be used; the message names the line and the problem."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken, else the token itself

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            _check_record(rec, f"{path}:{lineno}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs a role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant turn to learn from")
    elif not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)):
        raise DataError(f"{where}: need either 'messages' or string 'prompt' and 'completion'")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_completion(rec: dict, tokenizer) -> Example:
    prompt = _ids(tokenizer, rec["prompt"], special=True)
    answer = _ids(tokenizer, rec["completion"], special=False) + [tokenizer.eos_token_id]
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer)


def _render(tokenizer, msgs: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _encode_chat(rec: dict, tokenizer) -> Example:
    msgs = rec["messages"]
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenized so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, msgs[:i], gen=True)
        turn = _render(tokenizer, msgs[: i + 1], gen=False)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise DataError("the chat template does not render conversations incrementally")
        head = _ids(tokenizer, prompt[len(done):], special=False)
        body = _ids(tokenizer, turn[len(prompt):], special=False)
        ids += head + body
        labels += [IGNORE] * len(head) + body
        done = turn
    return Example(ids, labels)


def encode(records: list[dict], tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Tokenize and truncate to `max_length`; returns the examples and how many were dropped because
    no answer token survived truncation."""
    out, dropped = [], 0
    for rec in records:
        ex = _encode_chat(rec, tokenizer) if "messages" in rec else _encode_completion(rec, tokenizer)
        ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        # the first token is never predicted, so at least one label must sit after it
        if any(t != IGNORE for t in ex.labels[1:]):
            out.append(ex)
        else:
            dropped += 1
    return out, dropped


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle and hold out a fraction (at least one example when the fraction is positive)."""
    rows = examples[:]
    random.Random(seed).shuffle(rows)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise DataError(f"{len(rows)} examples are too few to hold out {n_eval} for evaluation")
    return rows[n_eval:], rows[:n_eval]


def collate(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels: [B, T]."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batches(examples: list[Example], batch_size: int, seed: int):
    """Endless stream of shuffled batches, epoch after epoch."""
    rng = random.Random(seed)
    while True:
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]
