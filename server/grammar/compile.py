"""Compiling what a request asks for into a grammar, once per distinct spec (an LRU of compiled grammars)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_schema", "regex", "choice", "structural_tag"]


class InvalidGrammar(ValueError):
    """The schema, regex or choice cannot be compiled (HTTP 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: Kind
    value: str = ""  # the JSON schema (canonical JSON), the regex, the choices as a JSON list, or an xgrammar
    # structural tag as JSON (tool calls: free text with constrained `<tool_call>` blocks)

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        # keys keep their order: the output's properties follow the schema's (sorting would reorder them)
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, options: Iterable[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options)))

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.value}".encode()).hexdigest()


class Grammars:
    """xgrammar on the served tokenizer: compile (cached), and a fresh matcher per request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], cache_size: int = 256):
        import xgrammar as xgr

        self._xgr = xgr
        eos = sorted(eos_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(getattr(tokenizer, "all_special_ids", [])) | {i for i, t in added.items() if getattr(t, "special", False)}
        self._refused = refused_bits((t for t in special if t < vocab_size), eos)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of `spec` (cached by its hash). Raises InvalidGrammar."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> Any:
        c = self.compiler
        try:
            if spec.kind == "json":
                return c.compile_builtin_json_grammar()
            if spec.kind == "json_schema":
                return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(spec.value)
            options = json.loads(spec.value)
            if not options or not all(isinstance(o, str) and o for o in options):
                raise InvalidGrammar("choice must be a non-empty list of non-empty strings")
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        except InvalidGrammar:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
            raise InvalidGrammar(f"cannot compile the {spec.kind.replace('_', ' ')}: {str(exc)[:300]}") from None

    def matcher(self, compiled: Any) -> Matcher:
        return Matcher(self._xgr.GrammarMatcher(compiled), self._refused)


class Matcher:
    """A request's grammar state: xgrammar's matcher, plus the special tokens no constrained text may hold.

    xgrammar treats a tokenizer's added special tokens (`<|im_start|>`, `<repo_name>`, ...) as text, so its JSON
    string rule would let them appear inside a string; they are refused here (end-of-sequence ids stay with
    the grammar, which allows them only where the text may end)."""

    def __init__(self, inner: Any, refused: list[tuple[int, int]]):
        self._inner, self._refused = inner, refused  # (word, clear-mask) pairs of the bitmask

    def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
        self._inner.fill_next_token_bitmask(bitmask, row)
        for word, keep in self._refused:
            bitmask[row, word] &= keep

    def accept_token(self, token: int) -> bool:
        return self._inner.accept_token(token)

    def is_terminated(self) -> bool:
        return self._inner.is_terminated()


def refused_bits(special_ids: Iterable[int], eos_ids: Iterable[int]) -> list[tuple[int, int]]:
    """The bitmask words and masks that clear `special_ids` (bar the eos ids): bit t%32 of word t//32."""
    words: dict[int, int] = {}
    for t in set(special_ids) - set(eos_ids):
        words[t // 32] = words.get(t // 32, 0) | (1 << (t % 32))
    return [(w, _int32(~bits & 0xFFFFFFFF)) for w, bits in sorted(words.items())]


def _int32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v
