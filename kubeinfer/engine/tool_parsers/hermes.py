"""`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.

Hermes 2 Pro / 3 and Qwen2.5 / Qwen3 chat templates. Text before the first block is content; a
last block the output cut off before `</tool_call>` still counts when its JSON is whole.
"""
from __future__ import annotations

from kubeinfer.engine.tool_parsers.base import PartialToolCall, ToolParser
from kubeinfer.engine.tool_parsers.partial_json import read_call_object, skip_ws
from kubeinfer.engine.tool_parsers.registry import register_tool_parser

START, END = "<tool_call>", "</tool_call>"


@register_tool_parser
class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = (START,)

    def parse_calls(self, section: str, is_final: bool) -> list[PartialToolCall] | None:
        calls: list[PartialToolCall] = []
        pos = 0
        while section.startswith(START, pos):
            i = skip_ws(section, pos + len(START))
            if i >= len(section):
                calls.append(PartialToolCall(None, "", is_complete=False))
                break
            if section[i] != "{":
                break
            call, end = read_call_object(section, i)
            if call is None:
                break
            calls.append(call)
            if end is None:
                break
            pos = skip_ws(section, end)
            if section.startswith(END, pos):
                pos = skip_ws(section, pos + len(END))
        return calls or (None if is_final else [])
