"""Structured output: constrain a request's tokens to a JSON schema, any JSON, a regex or a choice of strings.

`GrammarSpec` is what a request asks for (plain, hashable); `Grammars` compiles specs with xgrammar (cached by
spec hash) and makes a matcher per request; `apply_masks` / `accept` are the two calls the model runner makes
around sampling. The constraint is applied to the adapter's logits like any other sampling step, after the
penalties and logit_bias, so a constrained answer always parses (or ends with `finish_reason: "length"`).
"""

from server.grammar.compile import GrammarSpec, Grammars, InvalidGrammar
from server.grammar.masks import accept, apply_masks

__all__ = ["GrammarSpec", "Grammars", "InvalidGrammar", "accept", "apply_masks"]
