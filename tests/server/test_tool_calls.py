"""Tool-call text: the whole-answer parser, the streaming parser fed every split of the same text, and which
chat templates count as showing tools to the model."""

from __future__ import annotations

import json

import pytest

from server.tools import ToolCallStream, load_chat_template, parse_tool_calls, supports_tools

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris <tool_call>"}}\n</tool_call>'

CASES = [  # text -> (content, [(name, arguments)])
    ("plain answer", ("plain answer", [])),
    (CALL, (None, [("add", {"a": 1, "b": 2})])),
    (CALL + "\n" + CALL2, (None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris <tool_call>"})])),
    ("Let me add.\n" + CALL, ("Let me add.", [("add", {"a": 1, "b": 2})])),
    ("<tool_call>\n{not json}\n</tool_call>", ("<tool_call>\n{not json}\n</tool_call>", [])),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1', ('<tool_call>\n{"name": "add", "arguments": {"a": 1', [])),
    ('<tool_call>{"name": "x", "arguments": [1]}</tool_call>', ('<tool_call>{"name": "x", "arguments": [1]}</tool_call>', [])),
    ("a < b <tool", ("a < b <tool", [])),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_whole_answer(text, expected):
    content, calls = parse_tool_calls(text)
    assert (content, _calls(calls)) == expected


@pytest.mark.parametrize("text,expected", CASES)
def test_stream_gives_the_same_calls_for_every_split(text, expected):
    for cut in range(len(text) + 1):
        for step in (1, 3):  # the second part arrives in pieces too
            stream, content = ToolCallStream(), ""
            pieces = [text[:cut]] + [text[i:i + step] for i in range(cut, len(text), step)]
            for piece in pieces:
                c, _ = stream.feed(piece)
                content += c
            content += stream.finish()
            assert _calls(stream.calls) == expected[1], (cut, step)
            if not expected[1]:
                assert content == text
            else:  # content outside calls, whitespace between calls dropped
                assert content.strip() == (expected[0] or "")


def test_stream_holds_back_only_a_possible_opening():
    stream = ToolCallStream()
    assert stream.feed("x <tool") == ("x ", [])
    assert stream.feed("s are fun") == ("<tools are fun", [])


TEMPLATES = [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
    ("{# tools are not rendered #}{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
    ("You may use <tools></tools>.{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
    ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}", True),
    (None, False),
]


@pytest.mark.parametrize("template,supported", TEMPLATES)
def test_supports_tools(template, supported):
    assert supports_tools(template) is supported


def test_bundled_template_supports_tools_and_bad_names_are_refused(tmp_path):
    assert supports_tools(load_chat_template("chatml-tools"))
    (tmp_path / "t.jinja").write_text("{{ tools }}")
    assert load_chat_template(str(tmp_path / "t.jinja")) == "{{ tools }}"
    with pytest.raises(ValueError, match="chatml-tools"):
        load_chat_template("no-such-template")
