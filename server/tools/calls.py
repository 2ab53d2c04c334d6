"""Tool calls in the model's text: the grammar that makes `required` and named calls certain, and the parser
that turns `<tool_call>` blocks into OpenAI tool calls (after the answer, or incrementally while streaming)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# the xgrammar structural-tag builder whose output format is the `<tool_call>` JSON block above
XGRAMMAR_FORMAT = "qwen_3"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def tool_grammar(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool) -> str:
    """The structural tag (JSON text) constraining an answer under `tool_choice`. Inside every `<tool_call>`
    block: a JSON object whose `name` is one of the tools and whose `arguments` follow that tool's parameter
    schema. `auto`: free text, where a block may open; `required`: the answer is one block (or, with
    parallel calls, several separated by newlines) and nothing else; a named function: exactly its block."""
    import xgrammar as xgr
    from xgrammar.structural_tag import StructuralTag, TagsWithSeparatorFormat

    tag = xgr.get_model_structural_tag(XGRAMMAR_FORMAT, tools=tools, tool_choice=tool_choice, reasoning="disabled",
                                       parallel_tool_calls=parallel, max_whitespace_cnt=1)
    if tool_choice == "required":  # the builtin allows text before the first call: a call must come at once
        tag = StructuralTag(format=TagsWithSeparatorFormat(tags=tag.format.tags, separator="\n", at_least_one=True,
                                                           stop_after_first=not parallel))
    return tag.model_dump_json()


def _call(body: str) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments", {}), dict):
        return None
    return ParsedCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole answer: the text outside well-formed `<tool_call>` blocks (None when only
    whitespace is left), and the calls in order. A block that does not parse stays in the content."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    content += stream.finish()
    return (content.strip() or None) if calls else (content or None), calls


class ToolCallStream:
    """Incremental parsing of a streamed answer: `feed(text)` returns the content that is certainly not part
    of a call, and the calls completed so far; text that may start a `<tool_call>` is held back until it is
    decided. `finish()` flushes what is left (an unfinished block, e.g. cut by max_tokens, as content)."""

    def __init__(self) -> None:
        self._buf = ""
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buf += text
        out, new = [], []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _partial_open(self._buf)
                out.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            end = self._buf.find(CLOSE, start)
            if end < 0:
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                break
            call = _call(self._buf[start + len(OPEN):end])
            if call is None:
                out.append(self._buf[:end + len(CLOSE)])
            else:
                out.append(self._buf[:start])
                new.append(call)
            self._buf = self._buf[end + len(CLOSE):]
        self.calls += new
        content = "".join(out)
        return ("" if self.calls and not content.strip() else content), new

    def finish(self) -> str:
        rest, self._buf = self._buf, ""
        return rest


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
