"""One request's life inside the engine: its sampling parameters, tokens, text and finish state.

Plain Python (no torch): the scheduler and its tests use it without a model. The text is detokenized
incrementally as tokens arrive; `take_new()` hands out only text that can no longer change — a stop string
that might still be completing is held back, so no part of it ever reaches the client.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

AdapterKey = tuple[str, str]  # (adapter id, version = sha256 of the file)


class ContextLengthExceeded(ValueError):
    """prompt + max_tokens does not fit max_model_len (HTTP 400 context_length_exceeded)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off (vLLM extension)
    seed: int | None = None  # same seed, same output
    stop: tuple[str, ...] = ()  # stop strings; the stop string is not included in the text
    ignore_eos: bool = False  # vLLM extension
    logprobs: int | None = None  # None = none; k >= 0 = chosen token's logprob + top-k alternatives
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of each token generated so far
    repetition_penalty: float = 1.0  # vLLM: divide positive / multiply negative logits of seen tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0  # vLLM: no end-of-sequence or stop token before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # vLLM: these tokens end the request like end-of-sequence
    prompt_logprobs: int | None = None  # None = none; k >= 0: each prompt token's logprob + top-k alternatives
    cache_salt: str | None = None  # prefix-cache isolation (not a sampling control: the engine reads it once)
    grammar: object | None = field(default=None, compare=False)  # compiled structured-output grammar (opaque)


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's log-probability given the tokens before it, and the top alternatives there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SampledToken:
    """What the model runner returns for one row of one step (plain Python)."""

    token_id: int
    logprob: float | None = None  # log-probability of token_id under the model (None: not requested)
    top: list[tuple[int, float]] | None = None  # top-k (token id, logprob), best first
    error: str | None = None  # this row failed (e.g. non-finite logits): the request ends alone, no token
    prompt: list[PromptLogprob] | None = None  # at prefill, when asked: one per prompt token (the first None)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer:
    """Incremental detokenization: decodes a short window of ids and returns only the new, complete text.

    A window (not the whole output) keeps each step O(1); starting it with the prompt's last tokens keeps
    word boundaries (leading spaces) right. Text ending in U+FFFD is an incomplete UTF-8 character and
    waits for the next token.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], context: int = 5):
        self.decode = decode
        self.ids = list(prompt_ids[-context:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are already turned into text

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass(eq=False)
class Sequence:
    """A request in the scheduler. While it runs, `blocks` is its KV block table (block i holds positions
    i*block_size ..) and `num_computed` counts the tokens whose K/V are in those blocks; `slot` is its adapter
    slot (0 = base model). `kv_root` is the root of its blocks' hash chain (server.kv.hashing.namespace)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    adapter_key: AdapterKey | None = None
    adapter: object | None = None  # the parsed adapter of that version, loaded into a slot on admission
    tenant: str = ""  # whose request ("" = open single-tenant mode); fair admission takes turns by it
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # set at prefill when params ask for them
    prompt_sent: bool = False  # the prompt logprobs went out (with the first output)
    matcher: object | None = None  # this request's grammar matcher (structured output), advanced by the runner
    logprobs: list[SampledToken] = field(default_factory=list)  # per output token, when requested
    status: Status = Status.WAITING
    slot: int = 0
    kv_root: bytes = b""  # namespace of its cached blocks: adapter version (or base model) + cache_salt
    blocks: list[int] = field(default_factory=list)  # KV block table while running
    num_computed: int = 0  # tokens (prompt + output) whose K/V are in `blocks`
    hashes: list[bytes] = field(default_factory=list)  # hash chain of its full blocks so far (server.kv.hashing)
    published: int = 0  # leading full blocks registered in the prefix cache
    cached_tokens: int = -1  # prompt tokens found in the prefix cache at its first admission (-1: not yet)
    arrival: int = 0  # admission order of requests (preemption takes the youngest)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    text: str = ""  # detokenized output so far (cut at a stop string)
    sent_chars: int = 0
    sent_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def kv_owner(self) -> str | None:
        """Whose weights computed its K/V: the adapter `tenant/id`, None for the base model."""
        return None if self.adapter_key is None else self.adapter_key[0]

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def append(self, out: SampledToken, is_eos: bool) -> None:
        self.output_ids.append(out.token_id)
        if self.params.logprobs is not None:
            self.logprobs.append(out)
        if not is_eos:  # the eos token has no text
            self.text += self.detok.step(out.token_id)

    def find_stop(self, new_chars: int) -> bool:
        """Cut the text at the first stop string that ends in the last `new_chars` characters."""
        if not self.params.stop:
            return False
        longest = max(len(s) for s in self.params.stop)
        start = max(0, len(self.text) - new_chars - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take_new(self) -> tuple[str, list[int], list[SampledToken] | None]:
        """Text, token ids and logprobs not handed out yet. While running, the last len(longest stop)-1
        characters are held back: they may be the start of a stop string."""
        end = len(self.text)
        if self.status is not Status.FINISHED and self.params.stop:
            end = max(self.sent_chars, end - (max(len(s) for s in self.params.stop) - 1))
        text = self.text[self.sent_chars:end]
        ids = self.output_ids[self.sent_tokens:]
        lps = self.logprobs[self.sent_tokens:] if self.params.logprobs is not None else None
        self.sent_chars, self.sent_tokens = end, len(self.output_ids)
        return text, ids, lps
