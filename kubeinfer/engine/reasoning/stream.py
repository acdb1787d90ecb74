"""`ReasoningStream`: one streamed response's reasoning/content split, over any ReasoningParser.

The server makes one per choice, calls `feed(delta_text)` for each text delta and `finish()` at
the end; each returns a DeltaMessage with `reasoning_content` and/or `content`. With a tool parser
too, the content pieces go on into its ToolCallStream (tool calls are looked for after reasoning).
"""
from __future__ import annotations

from kubeinfer.engine.reasoning.base import ReasoningParser
from kubeinfer.engine.tool_parsers.base import DeltaMessage


class ReasoningStream:
    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self._num_reasoning = 0
        self._num_content = 0

    def feed(self, delta_text: str) -> DeltaMessage:
        self.text += delta_text
        return self._diff(*self.parser.split(self.text, is_final=False))

    def finish(self) -> DeltaMessage:
        return self._diff(*self.parser.split(self.text, is_final=True))

    def _diff(self, reasoning: str, content: str) -> DeltaMessage:
        new_reasoning = reasoning[self._num_reasoning:]
        new_content = content[self._num_content:]
        self._num_reasoning = max(self._num_reasoning, len(reasoning))
        self._num_content = max(self._num_content, len(content))
        return DeltaMessage(content=new_content or None, reasoning_content=new_reasoning or None)
