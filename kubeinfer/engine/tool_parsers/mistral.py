"""`mistral`: `[TOOL_CALLS]` then the calls, in either of Mistral's two shapes.

- tokenizer v3..v7: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
- tokenizer v11+: `[TOOL_CALLS]name[ARGS]{...}`, repeated for each call.
`[TOOL_CALLS]` is a special token, hence `skip_special_tokens = False`.
"""
from __future__ import annotations

import json

from kubeinfer.engine.tool_parsers.base import PartialToolCall, ToolParser
from kubeinfer.engine.tool_parsers.partial_json import read_call_object, scan_value, skip_ws
from kubeinfer.engine.tool_parsers.registry import register_tool_parser

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


@register_tool_parser
class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = (TOOL_CALLS,)
    skip_special_tokens = False

    def parse_calls(self, section: str, is_final: bool) -> list[PartialToolCall] | None:
        i = skip_ws(section, len(TOOL_CALLS))
        if i >= len(section):
            calls: list[PartialToolCall] = []
        elif section[i] == "[":
            calls = self._json_array(section, i)
        else:
            calls = self._name_args(section)
        return calls or (None if is_final else [])

    def _json_array(self, section: str, i: int) -> list[PartialToolCall]:
        calls = []
        pos = skip_ws(section, i + 1)
        while pos < len(section) and section[pos] == "{":
            call, end = read_call_object(section, pos)
            if call is None:
                break
            calls.append(call)
            if end is None:
                break
            pos = skip_ws(section, end)
            if not section.startswith(",", pos):
                break
            pos = skip_ws(section, pos + 1)
        return calls

    def _name_args(self, section: str) -> list[PartialToolCall]:
        calls = []
        pos = 0
        while section.startswith(TOOL_CALLS, pos):
            pos += len(TOOL_CALLS)
            args_at = section.find(ARGS, pos)
            if args_at < 0:
                calls.append(PartialToolCall(None, "", is_complete=False))
                break
            name = section[pos:args_at].strip()
            start = skip_ws(section, args_at + len(ARGS))
            end = scan_value(section, start)
            if end is None:
                partial = section[start:] if section[start:start + 1] in ("{", "[") else ""
                calls.append(PartialToolCall(name, partial, is_complete=False))
                break
            try:
                json.loads(section[start:end])
            except ValueError:
                break
            if not name:
                break
            calls.append(PartialToolCall(name, section[start:end], is_complete=True))
            pos = skip_ws(section, end)
        return calls
