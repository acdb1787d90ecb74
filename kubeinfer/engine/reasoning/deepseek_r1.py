"""`deepseek_r1`: everything up to `</think>` is reasoning, with or without a leading `<think>`
(DeepSeek-R1's and Qwen3-Thinking-2507's templates open the tag in the prompt); an output with no
`</think>` is all reasoning (cut off while thinking)."""
from __future__ import annotations

from kubeinfer.engine.reasoning.base import ReasoningParser
from kubeinfer.engine.reasoning.registry import register_reasoning_parser


@register_reasoning_parser
class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    requires_start = False
