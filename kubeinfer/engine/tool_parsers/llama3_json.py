"""`llama3_json`: Llama 3.1/3.2/3.3's JSON tool calls, `{"name": ..., "parameters": {...}}`.

The output is tool calls only when it starts with one (optionally after `<|python_tag|>`);
several calls are separated by `;`. `<|python_tag|>` is a special token, hence
`skip_special_tokens = False`.
"""
from __future__ import annotations

from kubeinfer.engine.tool_parsers.base import PartialToolCall, ToolParser
from kubeinfer.engine.tool_parsers.partial_json import read_call_object, skip_ws
from kubeinfer.engine.tool_parsers.registry import register_tool_parser

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = (PYTHON_TAG, "{")
    skip_special_tokens = False

    def find_start(self, text: str) -> int | None:
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i) or text.startswith("{", i):
            return i
        return None

    def holdback(self, text: str) -> int:
        # Only a start at the very beginning counts, so hold while the output is blank or a
        # prefix of the tag; anything else is content for good.
        i = skip_ws(text, 0)
        return len(text) if PYTHON_TAG.startswith(text[i:]) else 0

    def parse_calls(self, section: str, is_final: bool) -> list[PartialToolCall] | None:
        pos = len(PYTHON_TAG) if section.startswith(PYTHON_TAG) else 0
        calls: list[PartialToolCall] = []
        while True:
            i = skip_ws(section, pos)
            if i >= len(section) or section[i] != "{":
                break
            call, end = read_call_object(section, i, args_keys=("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            if end is None:
                break
            pos = skip_ws(section, end)
            if not section.startswith(";", pos):
                break
            pos += 1
        return calls or (None if is_final else [])
