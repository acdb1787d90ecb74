"""Reasoning parsers on recorded-style outputs: the finished split, the same output streamed in
random chunk sizes (pieces add up to it), and the token-level end check structured outputs uses."""
from __future__ import annotations

import random

import pytest

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.reasoning.registry import get_reasoning_parser, reasoning_parser_names
from kubeinfer.engine.reasoning.stream import ReasoningStream
from kubeinfer.engine.tool_parsers.registry import get_tool_parser
from kubeinfer.engine.tool_parsers.stream import ToolCallStream

THOUGHT = "The user wants 2+2. <b>4</b> is < 5 and </thin is not a tag.\n"

# (parser, output, reasoning_content, content)
CASES = [
    ("deepseek_r1", f"<think>{THOUGHT}</think>\n\nIt is 4.", THOUGHT, "\n\nIt is 4."),
    ("deepseek_r1", f"{THOUGHT}</think>It is 4.", THOUGHT, "It is 4."),  # template opened <think>
    ("deepseek_r1", f"{THOUGHT}and still thinking", THOUGHT + "and still thinking", None),
    ("deepseek_r1", "<think></think>Just 4.", None, "Just 4."),
    ("qwen3", f"<think>\n{THOUGHT}</think>\n\nIt is 4.", "\n" + THOUGHT, "\n\nIt is 4."),
    ("qwen3", "It is 4 <think> maybe.", None, "It is 4 <think> maybe."),  # thinking disabled
    ("qwen3", f"<think>{THOUGHT}", THOUGHT, None),  # cut off while thinking
    ("qwen3", "<thin", None, "<thin"),
]


def test_registry():
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(ConfigError, match="unknown reasoning parser 'r1'.*deepseek_r1"):
        get_reasoning_parser("r1")


@pytest.mark.parametrize("name, text, reasoning, content", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_extract(name, text, reasoning, content):
    assert get_reasoning_parser(name)().extract_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize("name, text, reasoning, content", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_pieces_add_up(name, text, reasoning, content):
    parser = get_reasoning_parser(name)()
    for seed in range(5):
        rng = random.Random(seed)
        stream, deltas, pos = ReasoningStream(parser), [], 0
        while pos < len(text):
            size = rng.randint(1, 5)
            deltas.append(stream.feed(text[pos:pos + size]))
            pos += size
        deltas.append(stream.finish())
        assert "".join(d.reasoning_content or "" for d in deltas) == (reasoning or "")
        assert "".join(d.content or "" for d in deltas) == (content or "")
        # No tag text ever leaks into a piece.
        assert not any("</think>" in (d.reasoning_content or "") for d in deltas)


def test_reasoning_then_tool_call_streams():
    """Content after the reasoning goes through a tool parser, as the server will chain them."""
    text = '<think>need weather</think>\n<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n</tool_call>'
    reasoning_stream = ReasoningStream(get_reasoning_parser("qwen3")())
    tools = ToolCallStream(get_tool_parser("hermes")())
    reasoning, args = "", ""
    for i in range(0, len(text), 3):
        d = reasoning_stream.feed(text[i:i + 3])
        reasoning += d.reasoning_content or ""
        args += "".join(t.arguments for t in tools.feed(d.content or "").tool_calls)
    d = reasoning_stream.finish()
    args += "".join(t.arguments for t in tools.feed(d.content or "").tool_calls)
    args += "".join(t.arguments for t in tools.finish().tool_calls)
    assert reasoning == "need weather" and args == '{"c": 1}' and tools.tools_called


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_token_level_end_check():
    parser = get_reasoning_parser("qwen3")(_Tokenizer({"<think>": 7, "</think>": 8, "a": 1}))
    assert not parser.is_reasoning_end([7, 1, 1])
    assert parser.is_reasoning_end([7, 1, 8, 1])
    assert not parser.is_reasoning_end([7, 8, 7, 1])  # a new block opened
    assert parser.is_reasoning_end([8])
    with pytest.raises(ConfigError, match="</think>.*drop --reasoning-parser"):
        get_reasoning_parser("deepseek_r1")(_Tokenizer({"<think>": 7}))
    with pytest.raises(ValueError, match="without a tokenizer"):
        get_reasoning_parser("qwen3")().is_reasoning_end([1])
