"""Reading JSON that may be cut off: where values end, and a call object's name and arguments.

The JSON parsers (hermes, llama3_json, mistral) see `{"name": ..., "arguments": {...}}` objects
arrive a few characters at a time. `scan_value` finds where a value ends without parsing it, or
says it has not ended yet; `read_call_object` turns a (possibly partial) call object into a
PartialToolCall whose arguments are the raw text of the arguments value: all of it once the value
closed, else everything so far when the value is an object or array (all of that text is inside
it, so it is a prefix of the final value), else nothing yet.
"""
from __future__ import annotations

import json

from kubeinfer.engine.tool_parsers.base import PartialToolCall

_WS = " \t\r\n"
_CLOSE = {"{": "}", "[": "]"}


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def scan_value(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None if the text ends inside it (or
    might go on: a number or literal touching the end). Does not validate."""
    if i >= len(text):
        return None
    ch = text[i]
    if ch == '"':
        return _scan_string(text, i)
    if ch in _CLOSE:
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _scan_string(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in _WS + ",}]":
        j += 1
    return j if j < len(text) else None


def _scan_string(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def scan_object(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None, bool]:
    """Members of the object at text[i] ('{'): ({key: (value_start, value_end or None)}, index
    past the object or None, whether the text so far is well-formed)."""
    members: dict[str, tuple[int, int | None]] = {}
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            return members, j + 1, True
        key_end = _scan_string(text, j) if text[j] == '"' else -1
        if key_end is None:
            return members, None, True
        if key_end == -1:
            return members, None, False
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return members, None, True
        if text[j] != ":":
            return members, None, False
        value_start = skip_ws(text, j + 1)
        value_end = scan_value(text, value_start)
        members[key] = (value_start, value_end)
        if value_end is None:
            return members, None, True
        j = skip_ws(text, value_end)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
        elif j < len(text) and text[j] != "}":
            return members, None, False
    return members, None, True


def read_call_object(text: str, i: int, args_keys: tuple[str, ...] = ("arguments", "parameters")
                     ) -> tuple[PartialToolCall | None, int | None]:
    """The call object at text[i] -> (PartialToolCall, index past it). (None, None) when it is not
    a call object; (call, None) while it is still open."""
    members, end, ok = scan_object(text, i)
    if not ok:
        return None, None
    name = None
    if "name" in members and members["name"][1] is not None:
        start, stop = members["name"]
        try:
            name = json.loads(text[start:stop])
        except ValueError:
            return None, None
        if not isinstance(name, str):
            return None, None
    key = next((k for k in args_keys if k in members), None)
    arguments = ""
    if key is not None:
        start, stop = members[key]
        if stop is not None:
            arguments = text[start:stop]
        elif start < len(text) and text[start] in _CLOSE:
            arguments = text[start:]
    if end is None:
        return PartialToolCall(name, arguments, is_complete=False), None
    if name is None:
        return None, None
    if key is None:
        arguments = "{}"
    try:
        json.loads(arguments)
    except ValueError:
        return None, None
    return PartialToolCall(name, arguments, is_complete=True), end
