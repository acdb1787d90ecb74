"""`ChatMessageParser`: one chat choice's text -> the assistant message (content,
reasoning_content, tool_calls), whole or as streamed deltas.

The request decides the tool mode (`tool_mode`):
- "none": the text is content;
- "auto": the server's --tool-call-parser finds calls in the text (`ToolCallStream`);
- "named": the output was constrained to the named function's arguments, so all of it is one call;
- "required": the output was constrained to a JSON array of {"name", "parameters"} items, each
  one call. Its streamed calls are sent once the array is whole (at the end of the choice).
With --reasoning-parser, `<think>...</think>` goes to reasoning_content first and only the rest is
read for content and calls. `finish_reason` "stop" becomes "tool_calls" when calls were made
(as vLLM and OpenAI report it).
"""
from __future__ import annotations

import json
from typing import Any

from kubeinfer.engine.reasoning.stream import ReasoningStream
from kubeinfer.engine.tool_parsers.base import DeltaMessage, DeltaToolCall, make_tool_call_id
from kubeinfer.engine.tool_parsers.stream import ToolCallStream


def tool_mode(tools: list | None, tool_choice: Any) -> str:
    """The request's tool mode; tool_choice "auto" (or none given with tools) is "auto"."""
    if not tools or tool_choice == "none":
        return "none"
    if tool_choice in (None, "auto"):
        return "auto"
    if tool_choice == "required":
        return "required"
    return "named"


def _call_json(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ChatMessageParser:
    """Args:
        mode: see tool_mode.
        tool_parser: the server's ToolParser (mode "auto" only).
        reasoning_parser: the server's ReasoningParser, or None.
        function_name: the named function (mode "named").
    """

    def __init__(self, mode: str, tool_parser: Any = None, reasoning_parser: Any = None,
                 function_name: str | None = None):
        self.mode = mode
        self.function_name = function_name
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        self._reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None
        self._tools = ToolCallStream(tool_parser) if mode == "auto" else None
        self._content = ""  # the text after reasoning (modes named and required read it whole)
        self._named_id: str | None = None
        self.tools_called = False

    # ---- whole -----------------------------------------------------------------------------------
    def message(self, text: str) -> dict:
        """The finished choice's message."""
        reasoning, content = None, text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.extract_reasoning(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if self.reasoning_parser is not None:
            msg["reasoning_content"] = reasoning
        calls = self._calls(content or "")
        if calls is not None:
            msg["content"], msg["tool_calls"] = calls
            self.tools_called = bool(msg["tool_calls"])
        return msg

    def _calls(self, content: str) -> tuple[str | None, list[dict]] | None:
        """(content left, calls) for the tool modes; None in mode "none"."""
        if self.mode == "none":
            return None
        if self.mode == "auto":
            extracted = self.tool_parser.extract_tool_calls(content)
            return extracted.content, [_call_json(c.id, c.name, c.arguments)
                                       for c in extracted.tool_calls]
        if self.mode == "named":
            return None, [_call_json(make_tool_call_id(), self.function_name, content)]
        items = _required_items(content)
        if items is None:  # cut off by max_tokens: the text is all the user can be shown
            return content, []
        return None, [_call_json(make_tool_call_id(), name, args) for name, args in items]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.tools_called else reason

    # ---- streamed ----------------------------------------------------------------------------------
    def feed(self, delta_text: str) -> dict | None:
        """A chunk's delta for new text, or None when there is nothing to send yet."""
        delta = self._reasoning.feed(delta_text) if self._reasoning else DeltaMessage(delta_text)
        return self._delta(delta, final=False)

    def finish(self) -> dict | None:
        """The last delta of the choice (held-back text, the required calls), or None."""
        delta = self._reasoning.finish() if self._reasoning else DeltaMessage()
        return self._delta(delta, final=True)

    def _delta(self, delta: DeltaMessage, final: bool) -> dict | None:
        out = DeltaMessage(reasoning_content=delta.reasoning_content)
        piece = delta.content or ""
        if self.mode == "none":
            out.content = piece or None
        elif self.mode == "auto":
            tools = self._tools.feed(piece) if piece or not final else DeltaMessage()
            if final:
                tools = _merge(tools, self._tools.finish())
            out.content, out.tool_calls = tools.content, tools.tool_calls
            self.tools_called = self._tools.tools_called
        elif self.mode == "named":
            if piece or (final and self._named_id is None):
                call = DeltaToolCall(0, arguments=piece)
                if self._named_id is None:
                    self._named_id = make_tool_call_id()
                    call.id, call.name = self._named_id, self.function_name
                out.tool_calls = [call]
                self.tools_called = True
        else:
            self._content += piece
            if final:
                items = _required_items(self._content)
                if items is None:
                    out.content = self._content or None
                else:
                    out.tool_calls = [DeltaToolCall(i, id=make_tool_call_id(), name=name,
                                                    arguments=args)
                                      for i, (name, args) in enumerate(items)]
                    self.tools_called = bool(items)
        if out.is_empty():
            return None
        d: dict[str, Any] = {}
        if out.reasoning_content:
            d["reasoning_content"] = out.reasoning_content
        if out.content:
            d["content"] = out.content
        if out.tool_calls:
            d["tool_calls"] = [_delta_call_json(c) for c in out.tool_calls]
        return d


def _merge(a: DeltaMessage, b: DeltaMessage) -> DeltaMessage:
    return DeltaMessage(content=((a.content or "") + (b.content or "")) or None,
                        tool_calls=a.tool_calls + b.tool_calls)


def _delta_call_json(call: DeltaToolCall) -> dict:
    d: dict[str, Any] = {"index": call.index}
    fn: dict[str, Any] = {"arguments": call.arguments}
    if call.id is not None:
        d["id"], d["type"] = call.id, "function"
        fn["name"] = call.name
    d["function"] = fn
    return d


def _required_items(text: str) -> list[tuple[str, str]] | None:
    """tool_choice "required"'s array -> (name, arguments JSON) per item; None if not whole."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return None
    return [(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]
