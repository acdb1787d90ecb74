"""`ToolCallStream`: one streamed response's tool-call state, over any ToolParser.

The server makes one per choice (`ToolCallStream(parser)`), calls `feed(delta_text)` for each text
delta and `finish()` once at the end, and sends each non-empty DeltaMessage as a chunk's delta.
Text before a tool-call section streams as content; the tail that may begin a section is held
back until it is clear; once a section starts, nothing more streams as content and each call
streams as its name (with a fresh id) and then argument fragments. If the finished output turns
out to hold no complete call, the held text is sent as content, so every path adds up to what
`parser.extract_tool_calls(whole_text)` returns.
"""
from __future__ import annotations

from kubeinfer.engine.tool_parsers.base import (DeltaMessage, DeltaToolCall, PartialToolCall,
                                                ToolParser, make_tool_call_id)


class ToolCallStream:
    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self._num_content = 0  # characters of self.text sent as content
        self._start: int | None = None
        self._sent_args: list[str] = []  # per call index: the arguments sent so far
        self.ids: list[str] = []

    @property
    def tools_called(self) -> bool:
        return bool(self.ids)

    def feed(self, delta_text: str) -> DeltaMessage:
        self.text += delta_text
        if self._start is None:
            self._start = self.parser.find_start(self.text)
        if self._start is None:
            safe = len(self.text) - self.parser.holdback(self.text)
            return DeltaMessage(content=self._take_content(safe))
        content = self._take_content(self._start)
        calls = self.parser.parse_calls(self.text[self._start:], is_final=False) or []
        return DeltaMessage(content=content, tool_calls=self._diff(calls))

    def finish(self) -> DeltaMessage:
        """Flush: the rest of the content, or the last calls' remaining arguments."""
        if self._start is None:
            return DeltaMessage(content=self._take_content(len(self.text)))
        content = self._take_content(self._start)
        calls = [c for c in self.parser.parse_calls(self.text[self._start:], is_final=True) or ()
                 if c.is_complete]
        if not calls and not self.ids:
            rest = self._take_content(len(self.text)) or ""
            return DeltaMessage(content=(content or "") + rest or None)
        return DeltaMessage(content=content, tool_calls=self._diff(calls))

    def _take_content(self, end: int) -> str | None:
        if end <= self._num_content:
            return None
        piece = self.text[self._num_content:end]
        self._num_content = end
        return piece

    def _diff(self, calls: list[PartialToolCall]) -> list[DeltaToolCall]:
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break  # a later call cannot be sent before this one has a name
            if index == len(self.ids):
                self.ids.append(make_tool_call_id())
                self._sent_args.append("")
                deltas.append(DeltaToolCall(index, id=self.ids[index], name=call.name))
            sent = self._sent_args[index]
            # A parser's partial arguments are a prefix of its final ones; anything else would be
            # text we cannot take back, so wait for it to become one.
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                piece = call.arguments[len(sent):]
                self._sent_args[index] = call.arguments
                if deltas and deltas[-1].index == index:
                    deltas[-1].arguments += piece
                else:
                    deltas.append(DeltaToolCall(index, arguments=piece))
        return deltas
