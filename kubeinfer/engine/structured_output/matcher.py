"""`StructuredOutputMatcher`: one request's position in its grammar.

Held by the manager (one per sample: with n > 1 each sample has its own matcher over the same
cached CompiledGrammar). The manager feeds it each output token once, in order (`accept_tokens`,
or xgrammar's batch accept through `grammar_batch.py`), and fills its row before the next token
is sampled. `rollback(n)` forgets accepted tokens; the engine never needs it today (preemption
keeps outputs, and no accepted token is ever discarded), it is there for speculative decoding.

Reasoning: with a reasoning parser the constraint starts after the reasoning ends. Pass the
parser as `reasoning` (anything with `is_reasoning_end(token_ids)`, see `ReasoningEndDetector`)
and the prompt; until the reasoning has ended the row allows every token and the grammar is not
advanced; the token after the end marker is the grammar's first input.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class ReasoningEndDetector(Protocol):
    """What the matcher needs from a reasoning parser (reasoning.base.ReasoningParser has it)."""

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether reasoning has ended by the end of `token_ids` (an end marker after the last
        start marker). Called once with the prompt, then with each output token alone."""


class StructuredOutputMatcher:
    """Accepts a request's output tokens and says which next tokens its grammar allows.

    Args:
        compiled: a CompiledGrammar from StructuredOutputCompiler.
        reasoning: a reasoning parser, when the request reasons before the constrained answer.
    """

    def __init__(self, compiled: Any, reasoning: ReasoningEndDetector | None = None,
                 prompt_token_ids: Sequence[int] = ()):
        import xgrammar as xgr  # here: an engine without constraints needs no xgrammar

        self._matcher = xgr.GrammarMatcher(compiled)
        self._reasoning = reasoning
        self._output_ids: list[int] = []  # every accepted token, reasoning included
        # Index in _output_ids where the grammar's input starts; None while still reasoning. A
        # prompt can end the reasoning itself (Qwen3's template with enable_thinking=False).
        done = reasoning is None or reasoning.is_reasoning_end(prompt_token_ids)
        self._content_start: int | None = 0 if done else None
        # xgrammar's is_terminated() is a C++ call through its FFI (some microseconds: a few ms
        # a step over 256 rows). Made without terminate_without_stop_token, a matcher ends only
        # by taking one of its stop tokens, so it is asked only then (and after a rollback).
        self._terminated = False
        self._stop_ids = frozenset(self._matcher.stop_token_ids)

    @property
    def is_reasoning_ended(self) -> bool:
        return self._content_start is not None

    @property
    def num_accepted_tokens(self) -> int:
        return len(self._output_ids)

    @property
    def is_grammar_driven(self) -> bool:
        """The next token goes straight into the grammar (reasoning has ended, the grammar has
        not): what `grammar_batch.GrammarBatch` may hand to xgrammar's batch calls."""
        return self._content_start is not None and not self._terminated

    @property
    def grammar_matcher(self) -> Any:
        """The xgrammar GrammarMatcher, for batch calls on grammar-driven rows only."""
        return self._matcher

    def record_grammar_token(self, token_id: int) -> None:
        """Count a token that a batch call fed to `grammar_matcher` and it accepted."""
        self._output_ids.append(token_id)
        if token_id in self._stop_ids:
            self._terminated = self._matcher.is_terminated()

    def accepted_token(self, index: int) -> int:
        """The index-th token this matcher accepted."""
        return self._output_ids[index]

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the request must finish."""
        return self._terminated

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance over the step's new tokens. False when the grammar rejects one: that token and
        those after it are not accepted, and the request cannot go on under its constraint
        (the scheduler finishes it; it cannot happen to a token sampled under this matcher's mask)."""
        for token_id in token_ids:
            if self._content_start is None:
                self._output_ids.append(token_id)
                if self._reasoning.is_reasoning_end((token_id,)):
                    self._content_start = len(self._output_ids)
                continue
            if self._terminated or not self._matcher.accept_token(token_id):
                return False
            self._output_ids.append(token_id)
            if token_id in self._stop_ids:
                self._terminated = self._matcher.is_terminated()
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (reasoning ones too)."""
        if not 0 <= num_tokens <= len(self._output_ids):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self._output_ids)} tokens")
        self._undo(num_tokens)

    def reset(self) -> None:
        """Back to the start, as if no token had been accepted."""
        self._undo(len(self._output_ids))

    def fill_bitmask_row(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a packed int32 row, see bitmask.py).
        While reasoning, or after termination, every token is allowed: the constraint is not on."""
        if self._content_start is None or self._terminated:
            bitmask[row].fill_(-1)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def _undo(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        new_len = len(self._output_ids) - num_tokens
        if self._content_start is not None:
            num_grammar = len(self._output_ids) - max(self._content_start, new_len)
            if num_grammar > 0:
                self._matcher.rollback(num_grammar)
            if self._reasoning is not None and new_len < self._content_start:
                self._content_start = None
        del self._output_ids[new_len:]
        self._terminated = self._matcher.is_terminated()
