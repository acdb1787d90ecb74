"""Tool parsers on outputs in each model family's format: the non-streamed result, and the same
output streamed in random chunk sizes, whose deltas must add up to it."""
from __future__ import annotations

import json
import random

import pytest

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.tool_parsers.registry import get_tool_parser, tool_parser_names
from kubeinfer.engine.tool_parsers.stream import ToolCallStream

WEATHER = {"city": "São Paulo", "unit": "celsius", "days": [1, 2], "note": "say \"hi\" {ok}"}

# (parser, output text as the model wrote it, expected content, expected [(name, arguments obj)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     + json.dumps(WEATHER, ensure_ascii=False) + '}\n</tool_call>',
     "Let me check.\n", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
     '{"arguments": {"y": [true, null]}, "name": "b"}\n</tool_call>', None,
     [("a", {"x": 1}), ("b", {"y": [True, None]})]),
    ("hermes", '<tool_call>\n{"name": "now", "arguments": {}}', None, [("now", {})]),  # no end tag
    ("hermes", "The answer is 4 < 5, no tools needed.", "The answer is 4 < 5, no tools needed.", []),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>",
     "<tool_call>\nnot json at all\n</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", '
     '"parameters": {}}', None, [("a", {"x": 1}), ("b", {})]),
    ("llama3_json", "Sure: {\"name\": \"x\"} is not a call here.",
     "Sure: {\"name\": \"x\"} is not a call here.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}, {"name": "now", "arguments": {}}]', None, [("get_weather", WEATHER), ("now", {})]),
    ("mistral", 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]now[ARGS]{}',
     "Checking.", [("get_weather", {"city": "Oslo"}), ("now", {})]),
    ("mistral", "No [TOOL] calls [here].", "No [TOOL] calls [here].", []),
    ("pythonic", '[get_weather(city="São Paulo", days=[1, 2], note=\'a ) b\'), now()]', None,
     [("get_weather", {"city": "São Paulo", "days": [1, 2], "note": "a ) b"}), ("now", {})]),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("pythonic", "Plain answer.", "Plain answer.", []),
]


def test_registry():
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(tool_parser_names())
    with pytest.raises(ConfigError, match="unknown tool call parser 'hermez'.*hermes"):
        get_tool_parser("hermez")


@pytest.mark.parametrize("name, text, content, calls", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_extract(name, text, content, calls):
    result = get_tool_parser(name)().extract_tool_calls(text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == calls
    assert len({c.id for c in result.tool_calls}) == len(calls)


def stream_in_chunks(parser, text: str, rng: random.Random):
    stream = ToolCallStream(parser)
    deltas, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, 6)
        deltas.append(stream.feed(text[pos:pos + size]))
        pos += size
    deltas.append(stream.finish())
    return stream, deltas


@pytest.mark.parametrize("name, text, content, calls", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_deltas_add_up(name, text, content, calls):
    parser = get_tool_parser(name)()
    expected = parser.extract_tool_calls(text)
    for seed in range(5):
        stream, deltas = stream_in_chunks(parser, text, random.Random(seed))
        streamed_content = "".join(d.content or "" for d in deltas)
        assert streamed_content == (expected.content or "")
        names: dict[int, str] = {}
        args: dict[int, str] = {}
        for d in deltas:
            for tc in d.tool_calls:
                if tc.name is not None:
                    assert tc.index not in names and tc.id  # the first delta of a call: id + name
                    names[tc.index] = tc.name
                else:
                    assert tc.index in names and tc.id is None
                args[tc.index] = args.get(tc.index, "") + tc.arguments
        assert [names[i] for i in sorted(names)] == [c.name for c in expected.tool_calls]
        assert [args.get(i, "") for i in sorted(names)] == [c.arguments for c in expected.tool_calls]
        assert stream.tools_called == bool(calls)


def test_content_streams_before_the_calls():
    """Text before a call is not held until the end; only a possible marker is."""
    stream = ToolCallStream(get_tool_parser("hermes")())
    assert stream.feed("Hello there").content == "Hello there"
    assert stream.feed(" <tool_").content == " "  # "<tool_" may begin <tool_call>
    d = stream.feed('call>{"name": "f", "arguments": {"a": ')
    assert d.content is None and [(t.name, t.arguments) for t in d.tool_calls] == [("f", '{"a": ')]
    assert stream.feed("1}}</tool_call>").tool_calls[0].arguments == "1}"
    assert stream.finish().is_empty()
