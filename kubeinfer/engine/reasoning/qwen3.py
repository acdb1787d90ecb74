"""`qwen3`: reasoning only when the output opens with `<think>` (Qwen3 writes the tag itself; with
enable_thinking=False the template closes an empty block in the prompt and the output is all
content). A `<think>` block cut off before `</think>` is all reasoning."""
from __future__ import annotations

from kubeinfer.engine.reasoning.base import ReasoningParser
from kubeinfer.engine.reasoning.registry import register_reasoning_parser


@register_reasoning_parser
class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    requires_start = True
