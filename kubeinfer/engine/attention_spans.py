"""Bidirectional attention spans: prompt ranges whose tokens see each other both ways.

Gemma 3 lets an image's tokens attend to each other bidirectionally; PaliGemma its whole prompt (the
"prefix"). A span is `(start, end)`, positions [start, end) of the prompt, spans ascending and
disjoint; a model class states its spans with `bidirectional_spans(num_prompt_tokens, mm_features)`
and every other token stays causal (decode tokens always are).

Everything else follows from one requirement: a span's K/V is only right once the whole span is in
one forward pass. So:

- the scheduler never ends a chunk inside a span (`stop_before_span`: the whole span or stop
  before it, vLLM's `disable_chunked_mm_input`); a span longer than the step's token budget is
  refused when the request is added (`check_span_budget`). A span waits for a step with room
  for all of it: running requests go first, so a span as long as the whole budget waits until no
  other request takes tokens in that step (as vLLM's);
- the prefix cache never hits part of a span (`round_cache_hit`), and a block holding span
  positions folds the span into its hash (`block_span_keys`), so K/V computed under one span is
  never reused under another;
- the attention kernels read per-query-token bounds (`token_bounds`): `span_lo`, the first
  position of the token's span, and `span_hi`, the last key position it may see (its own position
  for a causal token). A step with no span covering more than one of its tokens gets None, so the
  kernels' causal fast path is unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kubeinfer.engine.errors import RequestError

Span = tuple[int, int]


def check_span_budget(spans: Sequence[Span], budget: int) -> None:
    """RequestError when a span cannot be computed in one step of `budget` tokens."""
    for start, end in spans:
        if end - start > budget:
            raise RequestError(
                f"the prompt has a bidirectional attention span of {end - start} tokens (positions "
                f"{start}..{end - 1}: an image, or PaliGemma's whole prompt), which must be computed "
                f"in one engine step, but a step computes at most {budget} tokens; send a shorter "
                "prompt or smaller image, or raise --max-num-batched-tokens", "messages")


def stop_before_span(spans: Sequence[Span], start: int, num_new: int) -> int:
    """How many of num_new tokens from `start` to schedule so that the chunk does not end inside
    a span: num_new, or fewer, stopping just before the span it would split (0 if it starts
    there)."""
    end = start + num_new
    for s, e in spans:
        if s >= end:
            break
        if s < end < e:
            return max(s - start, 0)
    return num_new


def round_cache_hit(spans: Sequence[Span], num_cached: int, block_size: int) -> int:
    """The cached prefix length to use: num_cached, or less (a whole number of blocks) so that no
    span is cached in part; the positions dropped are recomputed with their span."""
    changed = True
    while changed and num_cached > 0:
        changed = False
        for s, e in spans:
            if s < num_cached < e:
                num_cached = s // block_size * block_size
                changed = True
    return num_cached


def block_span_keys(spans: Sequence[Span], start: int, end: int) -> tuple[tuple[str, int, int], ...]:
    """Keys of the spans overlapping the block [start, end), for its prefix-cache hash."""
    keys = []
    for s, e in spans:
        if s >= end:
            break
        if e > start:
            keys.append(("bidir", s, e))
    return tuple(keys)


def token_bounds(spans_per_req: Sequence[Sequence[Span]], starts: Sequence[int],
                 query_lens: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(span_lo, span_hi), int32 [T] over the step's flattened tokens, or None when every token is
    causal. Request r's chunk is positions [starts[r], starts[r] + query_lens[r]); a token inside
    a span [s, e) gets (s, e - 1), any other token at position p gets (p, p)."""
    if not any(_covers(spans, st, n) for spans, st, n in zip(spans_per_req, starts, query_lens)):
        return None
    lo_parts, hi_parts = [], []
    for spans, st, n in zip(spans_per_req, starts, query_lens):
        pos = np.arange(st, st + n, dtype=np.int32)
        lo, hi = pos.copy(), pos.copy()
        for s, e in spans:
            inside = (pos >= s) & (pos < e)
            lo[inside], hi[inside] = s, e - 1
        lo_parts.append(lo)
        hi_parts.append(hi)
    return np.concatenate(lo_parts), np.concatenate(hi_parts)


def _covers(spans: Sequence[Span], start: int, n: int) -> bool:
    """Whether the chunk holds a token that sees a key after its own position."""
    return any(e - s > 1 and s < start + n and e > start for s, e in spans)
