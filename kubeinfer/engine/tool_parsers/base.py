"""`ToolParser`: the contract every tool-call parser keeps, and the small types it returns.

A parser knows one model family's tool-call syntax. It says where the tool-call section starts
(`find_start`), how much of a text's tail to hold back because it may be the start of one
(`holdback`), and what calls a section holds so far (`parse_calls`, on partial text too). From that
the base class gives both paths: `extract_tool_calls(text)` for a finished output, and
`ToolCallStream` (stream.py) for deltas; they agree by construction.

Arguments are the JSON text the model wrote (OpenAI's `function.arguments` is a string), so a
streamed call's argument fragments concatenate to exactly the non-streamed `arguments`.
"""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One finished call: `arguments` is JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=make_tool_call_id)


@dataclass
class ExtractedToolCalls:
    """A finished output split: `content` is the text before the calls (None when empty)."""

    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass
class PartialToolCall:
    """A call as far as the text shows it. `name` is None until whole; `arguments` is a prefix of
    the final arguments text (whole once `is_complete`)."""

    name: str | None
    arguments: str
    is_complete: bool


@dataclass
class DeltaToolCall:
    """OpenAI's streamed `tool_calls[i]`: id and name in the first delta of a call, then argument
    fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class DeltaMessage:
    """What one streamed chunk adds: text, reasoning text, or tool-call pieces (any may be empty)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.content and not self.reasoning_content and not self.tool_calls


class ToolParser(ABC):
    """Base of every parser; subclasses set `name` and `start_markers` and write `parse_calls`.

    `skip_special_tokens`: what the detokenizer must use for this parser to see its markers
    (False where the markers are special tokens, e.g. Mistral's [TOOL_CALLS]).
    """

    name: ClassVar[str]
    start_markers: ClassVar[tuple[str, ...]]
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def find_start(self, text: str) -> int | None:
        """Index where the tool-call section starts, or None (yet)."""
        found = [i for m in self.start_markers if (i := text.find(m)) >= 0]
        return min(found) if found else None

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` (with no section start) may still begin one."""
        best = 0
        for marker in self.start_markers:
            for n in range(min(len(marker) - 1, len(text)), best, -1):
                if text.endswith(marker[:n]):
                    best = n
                    break
        return best

    @abstractmethod
    def parse_calls(self, section: str, is_final: bool) -> list[PartialToolCall] | None:
        """The calls in `section` (text from find_start on). While streaming (`is_final` False)
        the last call may be partial. With `is_final`, None means the section is not tool calls
        after all (it becomes content)."""

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """A finished output -> content and calls. Unfinished calls (output cut off) are dropped;
        an output with no complete call is all content."""
        start = self.find_start(text)
        if start is None:
            return ExtractedToolCalls(text, [])
        calls = [c for c in self.parse_calls(text[start:], is_final=True) or () if c.is_complete]
        if not calls:
            return ExtractedToolCalls(text, [])
        return ExtractedToolCalls(text[:start] or None,
                                  [ToolCall(c.name, c.arguments) for c in calls])
