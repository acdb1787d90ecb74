"""The attention metadata of the step being run, read by attention layers.

Model code takes `(input_ids, positions)` only; the model runner sets this context around the forward
pass so the same forward works eagerly and under CUDA graphs (where the tensors are persistent buffers).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


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

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


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
