"""Compiling what a request asks for into a grammar, once per distinct spec (an LRU of compiled grammars)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_schema", "regex", "choice"]


class InvalidGrammar(ValueError):
    """The schema, regex or choice cannot be compiled (HTTP 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: Kind
    value: str = ""  # the JSON schema (canonical JSON), the regex, or the choices as a JSON list

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

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
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
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
            options = json.loads(spec.value)
            if not options or not all(isinstance(o, str) and o for o in options):
                raise InvalidGrammar("choice must be a non-empty list of non-empty strings")
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        except InvalidGrammar:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
            raise InvalidGrammar(f"cannot compile the {spec.kind.replace('_', ' ')}: {str(exc)[:300]}") from None

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)
