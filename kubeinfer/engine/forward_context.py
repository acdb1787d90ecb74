"""The attention metadata of the step being run, read by attention layers, and its one builder.

Model code takes `(input_ids, positions)` only; the model runner sets this context around the forward
pass so the same forward works eagerly and under CUDA graphs (where the tensors are persistent buffers).

`build_attention_arrays` is the only place that turns (tokens already computed, tokens to compute,
block table) per request into positions, slot mapping and the rest: the runner's persistent batch,
its profiling and warm-up forwards, and the test fixture that drives a model over the paged cache all
call it, so they cannot drift apart.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionArrays:
    """The host-side (numpy) arrays of a step's AttentionMetadata, plus the tokens' positions."""

    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32
    block_tables: np.ndarray  # [R, W] int32
    max_query_len: int
    max_seq_len: int
    # bidirectional spans (attention_spans.token_bounds): per token the first position of its span
    # and the last key position it may see; None when every token of the step is causal
    span_lo: np.ndarray | None = None  # [T] int32
    span_hi: np.ndarray | None = None  # [T] int32

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def build_attention_arrays(num_computed: Sequence[int], query_lens: Sequence[int],
                           block_tables: Sequence[Sequence[int]], block_size: int,
                           min_table_width: int = 0) -> AttentionArrays:
    """Lay R requests end to end: request r computes query_lens[r] tokens at positions
    num_computed[r], num_computed[r] + 1, ...; its K/V slots come from block_tables[r].

    Args:
        num_computed: per request, tokens whose K/V is already in the cache.
        query_lens: per request, tokens computed this step (at least 1).
        block_tables: per request, its block ids (covering every position computed).
        block_size: tokens per block.
        min_table_width: pad the block-table width up to this (CUDA graphs use a fixed width).
    """
    num_reqs = len(query_lens)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    starts = np.asarray(num_computed, dtype=np.int64)
    lens = np.asarray(query_lens, dtype=np.int64)
    # positions: each request's run start..start+n-1, for every token at once
    req_of_token = np.repeat(np.arange(num_reqs), lens)
    positions = (np.arange(int(query_start_loc[-1]), dtype=np.int64)
                 - query_start_loc[:-1].astype(np.int64)[req_of_token] + starts[req_of_token])
    width = max(min_table_width, max((len(t) for t in block_tables), default=1), 1)
    # padded lists and one conversion: per-row numpy writes cost more in Python
    tables = np.array([list(t) + [0] * (width - len(t)) for t in block_tables],
                      dtype=np.int32).reshape(num_reqs, width)
    slot_mapping = (tables[req_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    seq_lens = (starts + lens).astype(np.int32)
    return AttentionArrays(positions=positions, slot_mapping=slot_mapping,
                           query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=tables,
                           max_query_len=int(lens.max()) if num_reqs else 0,
                           max_seq_len=int(seq_lens.max()) if num_reqs else 0)


@dataclass
class AttentionMetadata:
    """Where each token of the flattened batch reads and writes the paged KV cache.

    The batch is `num_reqs` requests laid end to end; request r owns query tokens
    [query_start_loc[r], query_start_loc[r+1]), which are the last tokens of its `seq_lens[r]`-token
    context. A prefill chunk, a chunk after a cached prefix and a single decode token are all the
    same case.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset; -1 = pad, skip
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_reqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks_per_req] int32
    max_query_len: int
    max_seq_len: int
    # bidirectional spans (attention_spans.py), None when every token is causal: query token t sees
    # keys <= span_hi[t] (its own position when causal); span_lo[t] is its span's first position
    span_lo: torch.Tensor | None = None  # [num_tokens] int32
    span_hi: torch.Tensor | None = None  # [num_tokens] int32

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def from_arrays(cls, arrays: AttentionArrays,
                    to_device: Callable[[np.ndarray], torch.Tensor]) -> "AttentionMetadata":
        """The device metadata of `arrays`, each copied with `to_device` (the runner's pinned,
        asynchronous copy on CUDA)."""
        return cls(slot_mapping=to_device(arrays.slot_mapping),
                   query_start_loc=to_device(arrays.query_start_loc),
                   seq_lens=to_device(arrays.seq_lens), block_tables=to_device(arrays.block_tables),
                   max_query_len=arrays.max_query_len, max_seq_len=arrays.max_seq_len,
                   span_lo=None if arrays.span_lo is None else to_device(arrays.span_lo),
                   span_hi=None if arrays.span_hi is None else to_device(arrays.span_hi))


_context: AttentionMetadata | None = None


@contextmanager
def set_forward_context(meta: AttentionMetadata | None):
    global _context
    prev, _context = _context, meta
    try:
        yield
    finally:
        _context = prev


def get_forward_context() -> AttentionMetadata | None:
    """The current step's metadata, or None outside a step (e.g. a plain forward with no cache)."""
    return _context
