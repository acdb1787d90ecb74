"""`ReasoningParser`: splits a `<think>...</think>` output into reasoning_content and content.

Two questions, one per layer:
- text (server): `extract_reasoning(text)` for a finished output; `stream.ReasoningStream` for
  deltas. Both come from one rule, `split(text, is_final)`, which returns the reasoning and the
  content so far, each a prefix of its final value (a tail that may begin a tag is held back), so
  the streamed pieces add up to the finished split.
- tokens (structured outputs): `is_reasoning_end(token_ids)`, the hook
  structured_output.matcher.StructuredOutputMatcher calls; it needs the tags to be single tokens
  of the model's tokenizer (they are, for the families these parsers are for).

Subclasses choose `requires_start`: whether output that does not open with the start tag is all
content (qwen3) or reasoning until the end tag (deepseek_r1, whose template opens the tag itself).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from kubeinfer.engine.errors import ConfigError


class ReasoningParser:
    name: ClassVar[str]
    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"
    requires_start: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None):
        """With a tokenizer, the tags' token ids are looked up (ConfigError if they are not single
        tokens); without one only the text methods work."""
        self.start_token_id: int | None = None
        self.end_token_id: int | None = None
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            missing = [t for t in (self.start_tag, self.end_tag) if t not in vocab]
            if missing:
                raise ConfigError(f"--reasoning-parser {self.name} needs {' and '.join(missing)} "
                                  "as tokens of the model's tokenizer, which has none; this model "
                                  "does not reason in that format: drop --reasoning-parser")
            self.start_token_id = vocab[self.start_tag]
            self.end_token_id = vocab[self.end_tag]

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether `token_ids` end outside reasoning: an end tag after the last start tag."""
        if self.end_token_id is None:
            raise ValueError(f"{type(self).__name__} was made without a tokenizer; token ids "
                             "cannot be read")
        for token_id in reversed(token_ids):
            if token_id == self.end_token_id:
                return True
            if token_id == self.start_token_id:
                return False
        return False

    def split(self, text: str, is_final: bool) -> tuple[str, str]:
        """(reasoning, content) of `text`; unless `is_final`, a tail that may begin a tag is held."""
        if text.startswith(self.start_tag):
            body = len(self.start_tag)
        elif not is_final and self.start_tag.startswith(text):
            return "", ""  # the start tag may still be arriving
        elif self.requires_start:
            return "", text
        else:
            body = 0
        end = text.find(self.end_tag, body)
        if end >= 0:
            return text[body:end], text[end + len(self.end_tag):]
        if is_final:
            return text[body:], ""
        return text[body:len(text) - _partial_suffix(text[body:], self.end_tag)], ""

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """A finished output -> (reasoning_content, content), None for an empty part."""
        reasoning, content = self.split(text, is_final=True)
        return reasoning or None, content or None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
