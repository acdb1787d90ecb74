"""ChatMessageParser: the whole message and the streamed deltas agree, in every tool mode, with and
without a reasoning parser (no model needed)."""
from __future__ import annotations

import json

import pytest

from kubeinfer.engine.reasoning.registry import get_reasoning_parser
from kubeinfer.engine.server.chat_message_parser import ChatMessageParser, tool_mode
from kubeinfer.engine.server.serving_chat import _merge_deltas
from kubeinfer.engine.tool_parsers.registry import get_tool_parser

HERMES = get_tool_parser("hermes")()
QWEN3 = get_reasoning_parser("qwen3")()
CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'


def _streamed(parser: ChatMessageParser, text: str, size: int) -> dict:
    """Feed `text` in pieces of `size` characters; join the deltas as a client does."""
    joined: dict = {}
    deltas = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    calls: dict[int, dict] = {}
    for d in filter(None, deltas):
        for key in ("content", "reasoning_content"):
            if key in d:
                joined[key] = joined.get(key, "") + d[key]
        for c in d.get("tool_calls", ()):
            call = calls.setdefault(c["index"], {"name": None, "arguments": ""})
            call["name"] = c["function"].get("name") or call["name"]
            call["arguments"] += c["function"]["arguments"]
    joined["calls"] = [calls[i] for i in sorted(calls)]
    return joined


@pytest.mark.parametrize("mode,text,reasoning", [
    ("none", "<think>hmm</think>plain answer", QWEN3),
    ("auto", "intro " + CALL, None),
    ("auto", "<think>let me call</think>" + CALL, QWEN3),
    ("named", '{"x": 1}', None),
    ("required", '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]', None),
    ("required", '[{"name": "f", "param', None),  # cut off: it stays text
])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_stream_adds_up_to_the_whole_message(mode, text, reasoning, size):
    def make():
        return ChatMessageParser(mode, HERMES if mode == "auto" else None, reasoning,
                                 "f" if mode == "named" else None)

    whole = make().message(text)
    streamed = _streamed(make(), text, size)
    assert (streamed.get("content") or None) == (whole["content"] or None)
    assert streamed.get("reasoning_content") == whole.get("reasoning_content")
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in whole.get("tool_calls") or ()]
    assert streamed["calls"] == calls
    for call in calls:
        json.loads(call["arguments"])


def test_finish_reason_and_modes():
    parser = ChatMessageParser("named", function_name="f")
    parser.message('{"x": 1}')
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    assert ChatMessageParser("none").finish_reason("stop") == "stop"
    assert tool_mode(None, "required") == "none" and tool_mode([{}], None) == "auto"
    assert tool_mode([{}], "none") == "none" and tool_mode([{}], {"type": "function"}) == "named"
    assert _merge_deltas({"content": "a"}, {"content": "b", "tool_calls": [1]}) == {
        "content": "ab", "tool_calls": [1]}
