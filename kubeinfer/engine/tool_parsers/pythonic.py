"""`pythonic`: a Python list of calls, `[get_weather(city="Oslo"), now()]` (Llama 3.2/4 style).

The output is tool calls only when it is such a list from its first character on (after blanks).
Keyword values are Python literals; `arguments` is their JSON (`json.dumps` of the keywords), so a
call's arguments are sent whole, once its closing parenthesis arrives.
"""
from __future__ import annotations

import ast
import json
import re

from kubeinfer.engine.tool_parsers.base import PartialToolCall, ToolParser
from kubeinfer.engine.tool_parsers.partial_json import skip_ws
from kubeinfer.engine.tool_parsers.registry import register_tool_parser

_NAME = re.compile(r"[A-Za-z_][\w.]*")


@register_tool_parser
class PythonicToolParser(ToolParser):
    name = "pythonic"
    start_markers = ("[",)

    def find_start(self, text: str) -> int | None:
        i = skip_ws(text, 0)
        return i if text.startswith("[", i) else None

    def holdback(self, text: str) -> int:
        return len(text) if not text.strip() else 0

    def parse_calls(self, section: str, is_final: bool) -> list[PartialToolCall] | None:
        calls: list[PartialToolCall] = []
        pos = skip_ws(section, 1)
        closed = False
        while pos < len(section):
            if section[pos] == "]":
                closed = True
                break
            match = _NAME.match(section, pos)
            if match is None:
                return None if is_final else calls
            open_at = skip_ws(section, match.end())
            if open_at >= len(section):
                break
            if section[open_at] != "(":
                return None if is_final else calls
            end = _matching_paren(section, open_at)
            if end is None:
                calls.append(PartialToolCall(match.group(), "", is_complete=False))
                break
            arguments = _arguments_json(section[pos:end])
            if arguments is None:
                return None if is_final else calls
            calls.append(PartialToolCall(match.group(), arguments, is_complete=True))
            pos = skip_ws(section, end)
            if section.startswith(",", pos):
                pos = skip_ws(section, pos + 1)
        if is_final and not (closed and calls and section[pos + 1:].strip() == ""):
            return None
        return calls


def _matching_paren(text: str, i: int) -> int | None:
    """Index past the parenthesis that closes text[i], skipping Python string literals."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in "'\"":
            j += 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= len(text):
                return None
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _arguments_json(call_text: str) -> str | None:
    try:
        node = ast.parse(call_text, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError, TypeError):
        return None
    if None in kwargs:  # **spread
        return None
    try:
        return json.dumps(kwargs, ensure_ascii=False)
    except (TypeError, ValueError):
        return None
