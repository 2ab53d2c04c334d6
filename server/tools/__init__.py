"""Function calling: which chat templates can show tools to the model, the grammar that guarantees a
`required` or named call (an xgrammar structural tag in the `<tool_call>` JSON format), and the parser that
turns the model's text into OpenAI `tool_calls` — whole, or as stream deltas.

One output format is supported: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
(Hermes/Qwen style, the format of the bundled `chatml-tools` template).
"""

from server.tools.calls import ParsedCall, ToolCallStream, parse_tool_calls, tool_grammar
from server.tools.template import BUNDLED, load_chat_template, supports_tools

__all__ = ["BUNDLED", "ParsedCall", "ToolCallStream", "load_chat_template", "parse_tool_calls", "supports_tools",
           "tool_grammar"]
